"""The runtime equals transformers' MambaForCausalLM / Mamba2ForCausalLM on the same weights, both layouts."""

import importlib.util

import pytest
import torch
from checkpoints import VOCAB
from transformers import Mamba2ForCausalLM, MambaForCausalLM

from runtime import load_model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


KERNELS_INSTALLED = any(importlib.util.find_spec(m) for m in ("mamba_ssm", "causal_conv1d"))


@pytest.mark.skipif(KERNELS_INSTALLED, reason="transformers would run CUDA kernels on CPU tensors; "
                                              "tests/gpu checks this parity on CUDA")
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("layout", ["", "_ssm"])
def test_float32_logits_match_transformers(checkpoints, arch, layout):
    hf_cls = MambaForCausalLM if arch == "mamba1" else Mamba2ForCausalLM
    reference = hf_cls.from_pretrained(checkpoints[arch]).eval()
    tokens = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens, use_cache=False).logits  # (2, 70, V)
    loaded = load_model(checkpoints[arch + layout])
    hidden, _ = loaded.model.hidden_states(tokens)
    got = loaded.model.logits(hidden)[..., :VOCAB]  # the mamba_ssm layout pads the vocabulary to 8
    assert _relative(got, expected) < 1e-4


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_layouts_share_a_fingerprint_and_differ_from_other_weights(checkpoints, arch):
    assert load_model(checkpoints[arch]).fingerprint == load_model(checkpoints[arch + "_ssm"]).fingerprint
    assert load_model(checkpoints["mamba1"]).fingerprint != load_model(checkpoints["mamba2"]).fingerprint


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(checkpoints, dtype):
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    full = load_model(checkpoints["mamba1"]).model.prefill(tokens)[0]
    half = load_model(checkpoints["mamba1"], dtype=dtype).model
    assert half.dtype == getattr(torch, dtype)
    assert _relative(half.prefill(tokens)[0], full) < 5e-2

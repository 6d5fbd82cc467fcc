"""The models the GPU benchmarks compare: raw `mamba_ssm` (`MambaLMHeadModel`) and this runtime, loaded from
the peer's own weights (saved in the mamba_ssm layout), both bf16 on the GPU. Shapes of Mamba1 (`130m`, `1.4b`)
and of Mamba2 (`mamba2-780m`, `mamba2-2.7b`: d_state 128, head dim 64, one group, mamba_ssm's defaults)."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import torch

from runtime import LoadedModel, ScaleMethod, ScaleSet, batch_scales, load_model

from . import random_model

VOCAB = 50280  # GPT-NeoX-20B's vocabulary, padded by MambaLMHeadModel itself
MAMBA2_SHAPES = {"mamba2-780m": (1536, 48), "mamba2-2.7b": (2560, 64)}  # d_model, n_layer of state-spaces' models
SHAPES = {**random_model.SHAPES, **MAMBA2_SHAPES}


def peer_config(name: str, conv_kernels: bool | None = None) -> dict:
    """The peer's `MambaConfig` fields for shape `name`, also the runtime's config.json. Mamba2's fused
    memory-efficient path needs the `causal_conv1d` kernels (`conv_kernels`: whether they import); without
    them the peer runs its unfused path, as this runtime does then."""
    d_model, n_layer = SHAPES[name]
    if conv_kernels is None:
        conv_kernels = importlib.util.find_spec("causal_conv1d") is not None
    ssm_cfg = {"layer": "Mamba2", "use_mem_eff_path": conv_kernels} if name in MAMBA2_SHAPES else {}
    return dict(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm_cfg, rms_norm=True,
                residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)


def peer_and_runtime(name: str):
    """(peer MambaLMHeadModel, this runtime's LoadedModel) of shape `name` with the same random weights."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = peer_config(name)
    torch.manual_seed(0)
    peer = MambaLMHeadModel(MambaConfig(**config), device="cuda", dtype=torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "config.json").write_text(json.dumps(config))
        torch.save(peer.state_dict(), Path(directory) / "pytorch_model.bin")
        loaded = load_model(directory, device="cuda", dtype="bfloat16", backend="mamba_ssm")
    return peer, loaded


def random_delta_scales(loaded: LoadedModel, batch: int = 1):
    """A per-channel (Mamba2: per-head) Δ scale set for every sequence of a batch: what a bank bucket costs."""
    config = loaded.config
    scale_set = ScaleSet(ScaleMethod.DELTA,
                         tuple(torch.rand(config.scale_channels) + 0.5 for _ in range(config.n_layer)))
    return batch_scales([scale_set] * batch, config, "cuda")

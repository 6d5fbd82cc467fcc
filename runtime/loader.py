"""Loading a checkpoint directory into a ready `MambaLM`, and the fingerprint a bank is keyed by."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from safetensors.torch import save_file

from .backend import select_backend
from .checkpoint import check_against, read_checkpoint
from .config import ModelConfig
from .errors import CheckpointError
from .model import MambaLM
from .quant import QuantizedWeight, quantize_model

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_",
                 "constant_")  # torch.nn.init's, skipped while a skeleton is built
FINGERPRINT_SAMPLES = 4096  # values hashed per tensor: enough to tell any two trainings apart, fast at 2.8b


@dataclass
class LoadedModel:
    model: MambaLM
    config: ModelConfig
    fingerprint: str
    path: Path
    layout: str  # "mamba_ssm" or "hf"
    quantization: str | None = None  # "int8", "int6", with "+embedding" when the embedding is quantised too


def fingerprint(config: ModelConfig, tensors: dict[str, torch.Tensor], variant: str = "") -> str:
    """sha256 of the architecture, every tensor's name and shape, and a strided sample of its values
    rounded to bfloat16 (so the same weights saved in float32 or bfloat16, in either layout, agree).
    `variant` names a transformation of the weights (e.g. a quantisation), which changes the model."""
    arch = {k: v for k, v in config.to_json().items() if k != "training_context_length"}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    digest.update(variant.encode())
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::stride][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(f"{name}{tuple(tensors[name].shape)}".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:  # bfloat16 matmuls are slow on CPUs; CUDA serves in bfloat16 like mamba_ssm
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


@contextlib.contextmanager
def _default_initialisation_skipped() -> Iterator[None]:
    """torch.nn.init's initialisers leave their tensor as it is while a skeleton is built on the meta device: the
    checkpoint overwrites every value, and on meta tensors the random initialisers run through torch._refs, whose
    first call imports torch._dynamo, a slow import that nothing else here needs. The patch is
    process-wide for the few milliseconds the skeleton takes: models are not built concurrently with a load."""
    with contextlib.ExitStack() as stack:
        for name in _INITIALISERS:
            stack.enter_context(mock.patch.object(torch.nn.init, name, _unchanged))
        yield


def _unchanged(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _place(model: MambaLM, dtype: torch.dtype) -> None:
    """Float parameters to `dtype`; quantised weights keep their integers and float32 row scales and
    dequantise to `dtype`. On CPU, the dense in_proj, out_proj and embedding (the tied LM head) weights are then
    stored input-major: each keeps its (out, in) shape and values as a view of an (in, out) tensor, the layout
    from which MKL multiplies a decode step's few rows fastest (a whole-prompt product is as fast either way)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            module.compute_dtype = dtype
    if model.device.type == "cpu":
        for name, param in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight")) or name in ("embedding.weight", "lm_head.weight"):
                param.data = param.data.t().contiguous().t()


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None, backend: str = "auto",
               quantize: str | None = None, quantize_embedding: bool = False) -> LoadedModel:
    """Reads, checks and places a checkpoint; raises CheckpointError naming the file on any fault.

    `quantize` ("int8" or "int6") quantises the weights as they load (from the checkpoint's own precision, so
    the result does not depend on `dtype`); a checkpoint saved quantised loads as it was saved."""
    device = torch.device(device)
    checkpoint = read_checkpoint(path)
    requested = None if quantize is None else quantize + ("+embedding" if quantize_embedding else "")
    if checkpoint.quantization and requested and requested != checkpoint.quantization:
        raise CheckpointError(checkpoint.path,
                              f"saved quantised as {checkpoint.quantization}; cannot load as {requested}")
    quantization = checkpoint.quantization or requested
    scheme, _, with_embedding = (quantization or "").partition("+")
    with torch.device("meta"), _default_initialisation_skipped():
        skeleton = MambaLM(checkpoint.config, select_backend(backend, device))
        if checkpoint.quantization:
            quantize_model(skeleton, scheme, bool(with_embedding))
    expected = {name: (t.shape, t.dtype) for name, t in skeleton.state_dict().items()}
    tensors = check_against(checkpoint, expected)
    model = skeleton.to_empty(device=device)
    model.load_state_dict(tensors, strict=True)
    if requested and not checkpoint.quantization:
        quantize_model(model, scheme, bool(with_embedding))
    # The fingerprint of a quantised model hashes its integers and scales: the same whether quantised now or
    # loaded from a quantised save, and never that of the full-precision weights.
    hashed = model.state_dict() if quantization else tensors
    _place(model, resolve_dtype(dtype, device))
    model.eval().requires_grad_(False)
    log.info("loaded %s (%s layout, %s, %d layers, d_model %d) on %s as %s%s with back-end %s", checkpoint.path,
             checkpoint.layout, checkpoint.config.arch, checkpoint.config.n_layer, checkpoint.config.d_model,
             device, model.dtype, f", weights {quantization}" if quantization else "", model.backend.name)
    return LoadedModel(model, checkpoint.config, fingerprint(checkpoint.config, hashed, quantization or ""),
                       checkpoint.path, checkpoint.layout, quantization)


def save_quantized(loaded: LoadedModel, out: str | Path) -> Path:
    """A quantised model as a checkpoint: its config.json plus a "quantization" record, model.safetensors
    with the int8 / packed int6 weights and float32 row scales, and the tokenizer.json if there is one."""
    assert loaded.quantization, "the model is not quantised"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((loaded.path / "config.json").read_text())
    scheme, _, with_embedding = loaded.quantization.partition("+")
    config["quantization"] = {"scheme": scheme, "embedding": bool(with_embedding)}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    state = {name: t.detach().to("cpu").contiguous() for name, t in loaded.model.state_dict().items()}
    save_file(state, out / "model.safetensors")
    if (loaded.path / "tokenizer.json").is_file():
        shutil.copy(loaded.path / "tokenizer.json", out / "tokenizer.json")
    return out

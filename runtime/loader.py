"""Loading a checkpoint directory into a ready `MambaLM`, and the fingerprint a bank is keyed by."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .backend import select_backend
from .checkpoint import check_against, read_checkpoint
from .config import ModelConfig
from .model import MambaLM

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FINGERPRINT_SAMPLES = 4096  # values hashed per tensor: enough to tell any two trainings apart, fast at 2.8b


@dataclass
class LoadedModel:
    model: MambaLM
    config: ModelConfig
    fingerprint: str
    path: Path
    layout: str  # "mamba_ssm" or "hf"


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


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = None, backend: str = "auto") -> LoadedModel:
    """Reads, checks and places a checkpoint; raises CheckpointError naming the file on any fault."""
    device = torch.device(device)
    checkpoint = read_checkpoint(path)
    with torch.device("meta"):
        skeleton = MambaLM(checkpoint.config, select_backend(backend, device))
    expected = {name: p.shape for name, p in skeleton.state_dict().items()}
    tensors = check_against(checkpoint, expected)
    model = skeleton.to_empty(device=device)
    model.load_state_dict(tensors, strict=True)
    model.to(resolve_dtype(dtype, device)).eval().requires_grad_(False)
    log.info("loaded %s (%s layout, %s, %d layers, d_model %d) on %s as %s with back-end %s", checkpoint.path,
             checkpoint.layout, checkpoint.config.arch, checkpoint.config.n_layer, checkpoint.config.d_model,
             device, model.dtype, model.backend.name)
    return LoadedModel(model, checkpoint.config, fingerprint(checkpoint.config, tensors), checkpoint.path, checkpoint.layout)

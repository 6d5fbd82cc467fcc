"""Kernel back-ends, chosen once when a model loads. Each implements the operator contract `ops.contract.Ops`.

- `torch`: `runtime.ops.torch_ops`, PyTorch (and C kernels on CPU), any device; the CPU path.
- `mamba_ssm`: `runtime.ops.cuda_ops`, the `mamba_ssm` kernels (and `causal_conv1d` when installed); CUDA only.
- `auto`: `mamba_ssm` on CUDA when it imports, `torch` otherwise. The choice is logged.
Asking for `mamba_ssm` by name where it cannot run is an error, not a silent fallback.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch

from .errors import BackendUnavailableError
from .ops import torch_ops
from .ops.contract import Ops

if TYPE_CHECKING:  # mypy checks here that every back-end module implements the contract
    from .ops import cuda_ops, reference

    _IMPLEMENTATIONS: tuple[Ops, ...] = (torch_ops, cuda_ops, reference)

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "mamba_ssm")


@dataclass(frozen=True)
class Backend:
    name: str
    ops: Ops
    conv_kernels: bool  # causal_conv1d's kernels are in use (else a PyTorch convolution)
    # Mamba1 prefill tensors of chunks longer than this laid out (b, channels, l) in memory, as the CUDA long scan
    # reads them: projections then write that layout directly instead of the scan copying (l, d) tensors at 64k
    # tokens. Shorter chunks (the short-chunk kernels' bursts of prompts) stay token-major: one GEMM for the
    # batch's tokens rather than a small one per sequence, and a token's channels loaded at once. None: never.
    channels_first_past: int | None

    def channels_first(self, length: int) -> bool:
        """Whether a Mamba1 prefill chunk of `length` tokens is laid out channels-first."""
        return self.channels_first_past is not None and length > self.channels_first_past


def _load_cuda_ops() -> ModuleType:
    return importlib.import_module("runtime.ops.cuda_ops")


def select_backend(name: str, device: torch.device | str) -> Backend:
    device = torch.device(device)
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown back-end {name!r} (known: {', '.join(BACKENDS)})")
    if name == "mamba_ssm" and device.type != "cuda":
        raise BackendUnavailableError(f"back-end 'mamba_ssm' needs a CUDA device, not {device}")
    if name in ("auto", "mamba_ssm") and device.type == "cuda":
        try:
            ops = _load_cuda_ops()
        except ImportError as missing:
            if name == "mamba_ssm":
                raise BackendUnavailableError(
                    f"back-end 'mamba_ssm' requested but it does not import ({missing}); pip install '.[cuda]'"
                ) from None
            log.warning("mamba_ssm is not installed (%s): using the PyTorch back-end on %s", missing, device)
        else:
            backend = Backend("mamba_ssm", cast(Ops, ops), ops.HAS_CONV_KERNELS, channels_first_past=ops.SHORT_CHUNK)
            log.info("back-end: mamba_ssm kernels, causal_conv1d kernels %s", "on" if backend.conv_kernels else "off")
            return backend
    log.info("back-end: PyTorch on %s", device)
    return Backend("torch", torch_ops, False, channels_first_past=None)

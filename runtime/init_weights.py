"""mamba_ssm's initialisation of a Mamba1 model, for models trained from scratch or benchmarked at random."""

from __future__ import annotations

import math

import torch

from .config import MAMBA1
from .mamba1 import Mamba1Mixer
from .model import MambaLM, Norm


def init_weights(model: MambaLM, seed: int, dt_min: float = 0.001, dt_max: float = 0.1) -> None:
    """mamba_ssm's initialisation: S4D-real A, Δ bias for Δ log-uniform in [dt_min, dt_max], rescaled out_proj.
    dt_min bounds the longest memory a channel starts with (about 1/dt_min tokens for A = −1)."""
    c = model.config
    if c.arch != MAMBA1:
        raise ValueError(f"init_weights initialises Mamba1 models, not {c.arch}")
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.Conv1d):
                module.reset_parameters()
            elif isinstance(module, Norm):
                module.weight.fill_(1.0)
        torch.nn.init.normal_(model.embedding.weight, std=0.02)
        for mixer in model.modules():
            if isinstance(mixer, Mamba1Mixer):
                _init_mixer(mixer, dt_min, dt_max)


def _init_mixer(mixer: Mamba1Mixer, dt_min: float, dt_max: float) -> None:
    c = mixer.config
    std = c.dt_rank ** -0.5
    torch.nn.init.uniform_(mixer.dt_proj.weight, -std, std)
    log_dt = torch.rand(c.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (d,)
    dt = torch.exp(log_dt).clamp(min=1e-4)
    assert mixer.dt_proj.bias is not None  # Mamba1's dt_proj has a bias
    mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
    mixer.A_log.copy_(torch.log(torch.arange(1, c.d_state + 1, dtype=torch.float32)).expand(c.d_inner, -1))
    mixer.D.fill_(1.0)
    mixer.out_proj.weight.div_(math.sqrt(c.n_layer))

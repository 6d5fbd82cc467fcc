"""The two calibrators of MambaExtend, on any `Objective`.

- ZO (zeroth order, SPSA): one scalar per layer; per step two evaluations at S ± c·δ with δ Rademacher,
  g = (L+ − L−)/(2c)·δ on the log-loss, S ← max(S − η·g, floor). Paper defaults: η = 0.001, c = 0.1, K = 50.
- BP (back-propagation): any granularity (per channel, per head, per channel and state); the log-scales
  are the only trainable tensors (weights frozen), optimised with Adam; scales stay positive as exp(log s).

Under torchrun every rank runs the same calibrator on its share of each step (extend.losses): the losses are
all-reduced inside the objective and the gradients here, so every rank takes the same steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm import tqdm

from runtime import ScaleSet

from . import distributed
from .losses import Objective

ZO_FLOOR = 0.001  # smallest scale SPSA may reach (the paper's clamp)


@dataclass
class CalibrationResult:
    scales: ScaleSet
    losses: list[float] = field(default_factory=list)  # training loss per step
    hyper: dict = field(default_factory=dict)  # what the manifest records about the run


def calibrate_zo(objective: Objective, init: ScaleSet, steps: int = 50, lr: float = 0.001, c: float = 0.1,
                 seed: int = 0, progress: bool = True) -> CalibrationResult:
    """SPSA on one positive scalar per layer, starting from `init` (layer granularity)."""
    if init.layers[0].dim() != 0:
        raise ValueError("ZO calibrates one scalar per layer: start it from a layer-granularity scale set")
    current = torch.stack(init.layers).float()  # (n_layer,)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=f"ZO {objective.name} @ {objective.length}", disable=not progress)
    with torch.no_grad():
        for step in bar:
            sign = torch.randint(0, 2, current.shape, generator=generator).float() * 2 - 1  # (n_layer,) ±1
            plus = (current + c * sign).clamp(min=ZO_FLOOR)
            minus = (current - c * sign).clamp(min=ZO_FLOOR)
            loss_plus = math.log(objective.run(partial(ScaleSet, init.method, tuple(plus)), step, backward=False))
            loss_minus = math.log(objective.run(partial(ScaleSet, init.method, tuple(minus)), step, backward=False))
            gradient = (loss_plus - loss_minus) / (2 * c) * sign
            current = (current - lr * gradient).clamp(min=ZO_FLOOR)
            losses.append((loss_plus + loss_minus) / 2)
            bar.set_postfix(log_loss=f"{losses[-1]:.4f}")
    hyper = {"name": "zo", "steps": steps, "lr": lr, "c": c, "floor": ZO_FLOOR, "objective": objective.name}
    return CalibrationResult(ScaleSet(init.method, tuple(current.unbind())), losses, hyper)


def calibrate_bp(objective: Objective, init: ScaleSet, steps: int = 200, lr: float = 0.05,
                 progress: bool = True) -> CalibrationResult:
    """Adam on log-scales of `init`'s granularity; only the scales receive gradients."""
    log_scales = [torch.log(s.float()).clone().requires_grad_(True) for s in init.layers]
    optimiser = torch.optim.Adam(log_scales, lr=lr)
    losses = []
    bar = tqdm(range(steps), desc=f"BP {objective.name} @ {objective.length}", disable=not progress)
    for step in bar:
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = objective.run(lambda: ScaleSet(init.method, tuple(torch.exp(p) for p in log_scales)), step,
                                 backward=True)
        for p in log_scales:  # each rank holds its share of the gradient (none where it had no rows)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            distributed.sum_across(p.grad)
        optimiser.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    scales = ScaleSet(init.method, tuple(torch.exp(p.detach()) for p in log_scales))
    hyper = {"name": "bp", "steps": steps, "lr": lr, "optimiser": "adam", "objective": objective.name}
    return CalibrationResult(scales, losses, hyper)

"""The runtime's decode speed, as the server decodes: greedy steps after a prefill, on any device."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from runtime import BatchScales, MambaLM
from runtime.decode_graph import DecodeGraphs

WARMUP_STEPS = 8  # before timing: graph capture, Triton compilation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def greedy_stepper(model: MambaLM, batch: int, prompt_len: int, scales: BatchScales | None = None,
                   graphed: bool = True) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """After a `prompt_len`-token prefill of `batch` sequences: a decode step (tokens (batch,) -> logits
    (batch, V)) through the CUDA-graph decoder (`graphed`, CUDA only, as the server runs it) or eager
    `MambaLM.step`, and the first tokens (batch,). Call under `torch.no_grad()`."""
    device = model.device
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    logits, state = model.prefill(prompt, scales=scales)
    if graphed:
        pool, slots = model.new_state(batch + 1), torch.arange(batch, device=device)  # + the scratch row
        pool.write_rows(slots, state)
        graphs = DecodeGraphs(model, pool)
        return (lambda t: graphs.step(t, slots, scales)), logits.argmax(-1)
    return (lambda t: model.step(t, state, scales)), logits.argmax(-1)


def decode_ms_per_token(model: MambaLM, batch: int, prompt_len: int, steps: int,
                        scales: BatchScales | None = None, graphed: bool = True) -> float:
    """Mean ms per greedy decode step of `batch` sequences after a `prompt_len`-token prefill of each (see
    `greedy_stepper`)."""
    device = model.device
    with torch.no_grad():
        step, tokens = greedy_stepper(model, batch, prompt_len, scales, graphed)
        for _ in range(WARMUP_STEPS):
            tokens = step(tokens).argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = step(tokens).argmax(-1)
        _sync(device)
    return (time.perf_counter() - start) / steps * 1e3

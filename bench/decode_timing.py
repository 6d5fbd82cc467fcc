"""The runtime's decode speed, as the server decodes: greedy steps after a prefill, on any device."""

from __future__ import annotations

import time

import torch

from runtime import BatchScales, MambaLM
from runtime.decode_graph import DecodeGraphs

WARMUP_STEPS = 8  # before timing: graph capture, Triton compilation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_ms_per_token(model: MambaLM, batch: int, prompt_len: int, steps: int,
                        scales: BatchScales | None = None, graphed: bool = True,
                        ssm_dtype: torch.dtype = torch.float32) -> float:
    """Mean ms per greedy decode step of `batch` sequences after a `prompt_len`-token prefill of each: through
    the CUDA-graph decoder (`graphed`, CUDA only, as the server runs it, from a state pool whose SSM states are
    stored in `ssm_dtype`) or eager `MambaLM.step`."""
    device = model.device
    with torch.no_grad():
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device,
                               generator=torch.Generator(device).manual_seed(0))
        logits, state = model.prefill(prompt, scales=scales)
        if graphed:
            pool, slots = model.new_state(batch + 1, ssm_dtype), torch.arange(batch, device=device)  # + scratch row
            pool.write_rows(slots, state)
            graphs = DecodeGraphs(model, pool)
            step = lambda t: graphs.step(t, slots, scales)  # noqa: E731
        else:
            step = lambda t: model.step(t, state, scales)  # noqa: E731
        tokens = logits.argmax(-1)  # (batch,)
        for _ in range(WARMUP_STEPS):
            tokens = step(tokens).argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            tokens = step(tokens).argmax(-1)
        _sync(device)
    return (time.perf_counter() - start) / steps * 1e3

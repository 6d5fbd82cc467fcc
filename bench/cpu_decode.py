"""CPU decode: this runtime against transformers' `MambaForCausalLM.generate` on the same weights.

Greedy steps after a 64-token prompt at batch 1, 4 and 16, the runtime as the server steps it (eager
`MambaLM.step` on rows of a state pool), with and without a per-sequence scale set, the same step on the
back-end's operators layer by layer (runtime.cpu_step off, "operators"), the runtime on a second copy of the
model whose projection weights are row-major again ("row-major": the layout before the loader stored a CPU
model's input-major), and the peer through
`generate` (its time per step: a run of 1 + steps new tokens minus a run of 1). The measurements of one round
are interleaved, the rounds repeated, the medians printed with the ratios (issue 29: batch 1 ≤ 3 ms and ≥ 6×
transformers' tokens/s, batch 16 ≤ 2× batch 1's time).

    python -m bench.cpu_decode [--model models/mamba-extend-default] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import MambaForCausalLM

from runtime import ScaleMethod, ScaleSet, batch_scales, load_model
from runtime.cpu_step import CpuStep

MODEL = Path(__file__).resolve().parents[1] / "models" / "mamba-extend-default"
PROMPT = 64
WARMUP = 4  # steps before timing


def _prompt(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def _random_sets(config, batch: int) -> list[ScaleSet]:
    """One A-spectrum set per channel for each sequence, each its own (what the shipped bank holds)."""
    g = torch.Generator().manual_seed(0)
    return [ScaleSet(ScaleMethod.A_SPECTRUM, tuple(torch.rand(config.d_inner, generator=g) + 0.5
                                                   for _ in range(config.n_layer))) for _ in range(batch)]


def runtime_ms(model, batch: int, steps: int, scaled: bool, prepared: bool = True) -> float:
    """ms per greedy step of `batch` sequences on rows 1 … batch of a pool (row 0 idle), after the prompt; without
    `prepared`, on the back-end's operators layer by layer (runtime.cpu_step off)."""
    off = contextlib.nullcontext() if prepared else mock.patch.object(CpuStep, "build", lambda model: None)
    with off:
        model._cpu_step = None  # built again at the first step (or not, when off)
        return _runtime_ms(model, batch, steps, scaled)


def _runtime_ms(model, batch: int, steps: int, scaled: bool) -> float:
    config = model.config
    scales = batch_scales(_random_sets(config, batch), config, "cpu") if scaled else None
    slots = torch.arange(1, batch + 1)
    pool = model.new_state(batch + 1)
    logits, state = model.prefill(_prompt(batch, config.vocab_size), scales=scales)
    pool.write_rows(slots, state)
    tokens = logits.argmax(-1)  # (batch,)
    for _ in range(WARMUP):
        tokens = model.step(tokens, pool, scales, slots).argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = model.step(tokens, pool, scales, slots).argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3


def peer_ms(peer, batch: int, steps: int) -> float:
    """ms per greedy step of transformers' `generate`: (1 + steps new tokens) − (1 new token), over steps."""
    prompt = _prompt(batch, peer.config.vocab_size)

    def generate(new: int) -> float:
        start = time.perf_counter()
        peer.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=0)
        return time.perf_counter() - start
    generate(WARMUP)
    return (generate(1 + steps) - generate(1)) / steps * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL, help="a Mamba1 checkpoint in the Hugging Face layout")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--steps", type=int, default=32, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed")
    parser.add_argument("--threads", type=int, help="torch's threads for both (default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    model = load_model(args.model).model
    row_major = load_model(args.model).model
    for param in row_major.parameters():
        param.data = param.data.contiguous()
    peer = MambaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    columns = ("runtime", "runtime_scaled", "row_major", "operators", "transformers")
    times = {(name, b): [] for name in columns for b in batches}
    with torch.no_grad():
        for round_ in range(args.rounds):
            for b in batches:
                times["runtime", b].append(runtime_ms(model, b, args.steps, scaled=False))
                times["runtime_scaled", b].append(runtime_ms(model, b, args.steps, scaled=True))
                times["row_major", b].append(runtime_ms(row_major, b, args.steps, scaled=False))
                times["operators", b].append(runtime_ms(model, b, args.steps, scaled=False, prepared=False))
                times["transformers", b].append(peer_ms(peer, b, args.steps))
                measured = ", ".join(f"{name} {times[name, b][-1]:.2f} ms" for name in columns)
                print(f"round {round_}, batch {b}: {measured}", file=sys.stderr, flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"CPU decode, {args.model.name}, float32, {torch.get_num_threads()} threads, {PROMPT}-token prompt, "
          f"{args.steps} steps × {args.rounds} rounds (medians)")
    print(f"{'batch':>5} {'runtime ms':>10} {'+scales ms':>10} {'row-major ms':>12} {'operators ms':>12} "
          f"{'transformers ms':>15} "
          f"{'speed-up':>8} {'tokens/s':>8} {'÷ batch 1':>9}")
    results = []
    for b in batches:
        ours, scaled, row_major_ms, operators, theirs = (median[name, b] for name in columns)
        row = {"batch": b, "runtime_ms": round(ours, 3), "runtime_scaled_ms": round(scaled, 3),
               "row_major_ms": round(row_major_ms, 3),
               "operators_ms": round(operators, 3),
               "transformers_ms": round(theirs, 3), "speed_up": round(theirs / ours, 2),
               "runtime_tokens_per_s": round(b * 1e3 / ours),
               "time_vs_batch_1": round(ours / median["runtime", batches[0]], 2)}
        results.append(row)
        print(f"{b:>5} {ours:>10.2f} {scaled:>10.2f} {row_major_ms:>12.2f} {operators:>12.2f} {theirs:>15.2f} "
              f"{row['speed_up']:>7.2f}× {row['runtime_tokens_per_s']:>8} {row['time_vs_batch_1']:>8.2f}×", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

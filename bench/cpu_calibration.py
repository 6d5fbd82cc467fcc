"""One BP calibration step on CPU: the compiled scan backward (runtime/ops/cpu_scan_grad) against PyTorch's
autograd over the blocked scan (the peer), beside the prefill without gradients, in one run.

    python -m bench.cpu_calibration --data ../shared/data/gutenberg/train-01.jsonl.xz --lengths 2k,8k

Per length: the prefill without gradients of a batch of passkey prompts (the compiled forward scan); BP steps
of build_bank's passkey objective (A-spectrum scales per channel, the perplexity hinge on, the calibration half
of --data, every book encoded beforehand), the mean time of a step over `--steps` steps of `calibrate_bp` and
its ratio to the prefill, with the compiled backward at --micro-batch-size without per-layer recomputation
(`build_bank --no-recompute`); and at --peer-lengths one step of the peer as build_bank ran it before (whole
batch, per-layer recomputation).
Peak resident memory is the process's (VmHWM), reset before each measurement (Linux /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from unittest import mock

import torch

from extend.build_bank import CalibrationData
from extend.calibrate import calibrate_bp
from extend.losses import passkey_objective
from extend.passkey import make_batch, parse_templates
from extend.sources import parse_mixture, parse_sources
from runtime import MambaLM, ScaleMethod, ScaleSet, load_model
from runtime.ops import cpu_scan_grad
from runtime.tokenizer import find_tokenizer
from scale_bank import parse_buckets

from .report import print_row, print_table, save_json

MODEL = Path(__file__).resolve().parents[1] / "models" / "mamba-extend-default"


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _prefill_seconds(model: MambaLM, tokens: torch.Tensor, repeats: int = 2) -> float:
    """The fastest of `repeats` prefills without gradients of tokens (b, l)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model.hidden_states_only(tokens)
            times.append(time.perf_counter() - started)
    return min(times)


def _bp_seconds(model: MambaLM, data: CalibrationData, tokenizer, length: int, args, steps: int, recompute: bool,
                micro_batch: int | None) -> tuple[float, float]:
    """(mean seconds of a step over `steps` BP steps of build_bank's passkey objective, peak GiB)."""
    objective = passkey_objective(model, tokenizer, data.calibration.haystack, length, args.batch_size, args.seed,
                                  checkpoint=recompute, text=data.calibration, ppl_weight=args.ppl_weight,
                                  ppl_slack=0.02, templates=parse_templates("line"), micro_batch=micro_batch)
    init = ScaleSet.identity(model.config, ScaleMethod.A_SPECTRUM, "channel")
    _reset_peak()
    started = time.perf_counter()
    calibrate_bp(objective, init, steps=steps, lr=0.05, progress=False)
    return (time.perf_counter() - started) / steps, _peak_gib()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_calibration", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--data", nargs="+", required=True, help="calibration text (build_bank's --data)")
    p.add_argument("--lengths", default="2k,8k")
    p.add_argument("--peer-lengths", default="2k", help="lengths at which the peer also runs ('' for none)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--recompute", action="store_true", help="the compiled backward with per-layer recomputation")
    p.add_argument("--steps", type=int, default=3, help="BP steps timed with the compiled backward")
    p.add_argument("--ppl-weight", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if cpu_scan_grad.kernels() is None:
        raise SystemExit("no C compiler: the compiled scan backward is not available")
    model = load_model(str(args.model), device="cpu").model.requires_grad_(False)
    tokenizer = find_tokenizer(str(args.model), None)
    specs = parse_sources(args.data)
    data = CalibrationData.of(specs, parse_mixture(None, specs), tokenizer, args.seed, 0.5)
    for text in data.calibration.texts.values():  # encoded at first use otherwise: inside the timed steps
        for index in range(len(text.docs)):
            text.ids(index)
    peer_lengths = set(parse_buckets(args.peer_lengths)) if args.peer_lengths else set()
    print(f"CPU BP step, {args.model.name}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    rows = []
    for length in parse_buckets(args.lengths):
        prompts = make_batch(tokenizer, length, args.batch_size, random.Random(args.seed), data.calibration.haystack,
                             [0.5] * args.batch_size).tokens  # (batch, length)
        row: dict = {"length": length, "prefill_s": _prefill_seconds(model, prompts)}
        row["step_s"], row["peak_gib"] = _bp_seconds(model, data, tokenizer, length, args, args.steps, args.recompute,
                                                     args.micro_batch_size)
        row["step_over_prefill"] = row["step_s"] / row["prefill_s"]
        if length in peer_lengths:
            with mock.patch.object(cpu_scan_grad, "runs", lambda delta, A: False):  # the blocked scan's autograd
                row["peer_step_s"], row["peer_peak_gib"] = _bp_seconds(model, data, tokenizer, length, args, 1,
                                                                       True, None)
            row["peer_over_step"] = row["peer_step_s"] / row["step_s"]
        rows.append(row)
        print_row(row)
    print_table(["tokens", "prefill s", "BP step s", "step / prefill", "peak GiB", "peer step s", "peer peak GiB"],
                [[f"{r['length']}", f"{r['prefill_s']:.2f}", f"{r['step_s']:.2f}", f"{r['step_over_prefill']:.1f}",
                  f"{r['peak_gib']:.2f}", f"{r.get('peer_step_s', float('nan')):.1f}",
                  f"{r.get('peer_peak_gib', float('nan')):.2f}"] for r in rows])
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

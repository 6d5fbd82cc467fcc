"""The extension methods side by side: one bank per method, built on training text, scored on evaluation text.

    python -m extend.compare --model DIR --train-data TRAIN_BOOKS --eval-data EVAL_BOOKS \
        --buckets 1k,2k,4k,8k,16k,32k --lengths 512,1k,2k,4k,8k,16k,32k --out compare/

Methods (`--methods`, default all):
  delta-zo        Δ scale, one per layer, zeroth-order on perplexity (the MambaExtend paper's recipe)
  delta-bp        Δ scale per channel, back-propagation on passkey retrieval with the perplexity hinge
  a_spectrum-bp   A scale per channel, back-propagation, same objective
  decimate        DeciMamba: the decimating layer chosen per bucket by a sweep on passkey retrieval
Each bank is built by `extend.build_bank` into OUT/banks/METHOD (an existing one is resumed, so a stopped
run goes on where it was; `--jobs N` builds N at once), then evaluated by `extend.evaluate`'s code: passkey
accuracy and perplexity at every length, the base model once. Writes OUT/compare.json, compare.md (a table
per task: a row per method) and compare.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from scale_bank import bucket_name

from . import evaluate
from .jobs import Job, run_jobs

METHODS = {  # method -> extend.build_bank flags
    "delta-zo": ["--method", "delta", "--calibrator", "zo", "--granularity", "layer", "--task", "ppl"],
    "delta-bp": ["--method", "delta", "--calibrator", "bp", "--granularity", "channel", "--task", "passkey"],
    "a_spectrum-bp": ["--method", "a_spectrum", "--calibrator", "bp", "--granularity", "channel", "--task", "passkey"],
    "decimate": ["--method", "decimate", "--task", "passkey"],
}


def _build_bank_argv(args, method: str, out: Path) -> list[str]:
    argv = ["--model", str(args.model), "--data", *map(str, args.train_data), "--out", str(out), "--resume",
            "--buckets", args.buckets, "--seed", str(args.seed), "--device", args.device, "--no-progress",
            "--batch-size", str(args.batch_size), "--eval-samples", str(args.eval_samples)]
    for flag, value in (("--tokenizer", args.tokenizer), ("--dtype", args.dtype),
                        ("--training-length", args.training_length)):
        if value is not None:
            argv += [flag, str(value)]
    if method != "decimate" and args.steps is not None:
        argv += ["--steps", str(args.steps)]
    return argv + METHODS[method]


def build_banks(args) -> dict[str, Path]:
    """Builds (or completes) each method's bank, `args.jobs` at a time; returns method -> bank directory."""
    banks = {method: args.out / "banks" / method for method in args.methods}
    failed = run_jobs([Job(method, "extend.build_bank", _build_bank_argv(args, method, out),
                           out.parent / f"{method}.stderr") for method, out in banks.items()], args.jobs)
    if failed:
        raise SystemExit(f"extend.compare: building the {', '.join(failed)} bank(s) failed (see "
                         + ", ".join(str(banks[m] / "build.log") for m in failed) + ")")
    return banks


def _evaluation_args(args, bank: Path | None) -> argparse.Namespace:
    return argparse.Namespace(model=args.model, tokenizer=args.tokenizer, bank=bank, task="passkey,ppl",
                              lengths=args.lengths, data=args.eval_data, samples=args.samples,
                              batch_size=args.eval_batch_size, templates="line", training_length=args.training_length,
                              seed=args.seed, device=args.device, dtype=args.dtype, backend="auto", quantize=None,
                              quantize_embedding=False)


def compare(args) -> list[dict]:
    """Rows {task, length, base, METHOD: value, METHOD_bucket: name, [METHOD_tail]} for every length and task."""
    banks = build_banks(args)
    rows: list[dict] = []
    for i, (method, bank) in enumerate(banks.items()):
        # the base model is scored once; and beside decimate buckets, on the kept tail too
        scored = evaluate.evaluate(_evaluation_args(args, bank), base=i == 0 or method == "decimate")
        if i == 0:
            rows = [{"task": r["task"], "length": r["length"], "base": r["base"]} for r in scored]
        for row, result in zip(rows, scored, strict=True):
            row[method], row[f"{method}_bucket"] = result["bank"], result["bucket"]
            if "tail" in result:  # a decimate bucket: perplexity of the kept tail, base on the same tokens
                row[f"{method}_tail"], row[f"{method}_tail_base"] = result["tail"], result["base"]
    return rows


def markdown(rows: list[dict], methods: list[str]) -> str:
    out = []
    for task, subset in evaluate.by_task(rows).items():
        fmt = evaluate.value_format(task)
        out += evaluate.task_table(task, subset, "method", [(name, name) for name in ("base", *methods)])
        for method in methods:
            tails = [r for r in subset if f"{method}_tail" in r]
            if tails:
                out.append(f"\n({method}: perplexity of each window's last {tails[0][f'{method}_tail']} tokens where "
                           f"its bucket decimates; the base model's on the same tokens: " + ", ".join(
                               f"{bucket_name(r['length'])} {fmt(r[f'{method}_tail_base'])}" for r in tails) + ")")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m extend.compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--tokenizer")
    p.add_argument("--train-data", nargs="+", required=True, help="calibration text (the banks are built on it)")
    p.add_argument("--eval-data", nargs="+", required=True, help="evaluation text (never used for calibration)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--buckets", default="1k,2k,4k,8k,16k,32k")
    p.add_argument("--lengths", default="512,1k,2k,4k,8k,16k,32k")
    p.add_argument("--samples", type=int, default=50, help="evaluation samples per length and task")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, help="calibration steps per bucket (build_bank's defaults otherwise)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration samples per step")
    p.add_argument("--eval-samples", type=int, default=20, help="held-out samples per candidate and bucket")
    p.add_argument("--jobs", type=int, default=1, help="banks built at once, each in its own process")
    p.add_argument("--training-length", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.jobs < 1:
        p.error(f"--jobs: must be at least 1, got {args.jobs}")
    for method in args.methods:
        if method not in METHODS:
            p.error(f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})")
    rows = compare(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows, args.methods)
    (args.out / "compare.md").write_text(table)
    evaluate.plot(rows, args.out / "compare.png", f"{args.model.name}: {args.samples} samples per point",
                  [("base", "base")] + [(m, m) for m in args.methods])
    print("\n" + table)


if __name__ == "__main__":
    main()

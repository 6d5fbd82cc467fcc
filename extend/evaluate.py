"""Evaluate a model with and without its bank over context lengths: a table and a plot.

    python -m extend.evaluate --model DIR --bank BANK --task passkey,ppl --lengths 512,1k,2k,4k,8k,16k,32k \
        --data ../shared/data/gutenberg/eval.jsonl.xz --samples 50 --out results/

Writes `results.json`, `results.md` and `results.png` under --out and prints the table. The bank's scales
are chosen per length exactly as the server chooses them (scale_bank.select with n = the length). A decimate
bucket decimates the prefill; its perplexity, and the base model's beside it, is then that of the last
`keep_last` tokens of each window (the positions a decimation keeps in place), and the row says so (`tail`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from runtime import Decimation, load_model  # noqa: E402
from runtime.tokenizer import find_tokenizer  # noqa: E402
from scale_bank import Bank, bucket_name, parse_buckets, select  # noqa: E402

from .data import read_documents  # noqa: E402
from .objectives import passkey_accuracy, perplexity  # noqa: E402
from .passkey import filler_haystack  # noqa: E402
from .tokens import TokenSource  # noqa: E402

METRIC = {"passkey": "passkey accuracy", "ppl": "perplexity"}


def evaluate(args, base: bool = True) -> list[dict]:
    """Rows {length, task, bucket, base, bank, …}; without `base`, only the bank's values."""
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                        quantize=args.quantize, quantize_embedding=args.quantize_embedding)
    tokenizer = find_tokenizer(args.model, args.tokenizer)
    bank = Bank.load(args.bank, loaded.config, loaded.fingerprint, loaded.quantization) if args.bank else None
    source = TokenSource(read_documents(args.data), tokenizer)
    haystack = filler_haystack(tokenizer) if args.haystack == "filler" else source.window
    training_length = args.training_length or loaded.config.training_context_length
    rows = []
    for length in parse_buckets(args.lengths):
        choice = select(bank, length, "auto", training_length)
        decimation = None
        if choice.method == "decimate":
            decimation = Decimation.from_params(bank.entry(choice.name).params, loaded.config.n_layer, training_length)
        variants = ({"base": (None, None)} if base else {}) | (
            {"bank": (choice.scales, decimation)} if bank is not None else {})
        tail = None if decimation is None else decimation.keep_last
        for task in args.task.split(","):
            row = {"length": length, "task": task, "bucket": choice.name}
            if task == "ppl" and tail is not None:
                row["tail"] = tail
            for variant, (scales, decimate) in variants.items():
                if task == "passkey":
                    accuracy, ce = passkey_accuracy(loaded.model, tokenizer, haystack, length, args.samples, scales,
                                                    args.seed, args.batch_size, decimation=decimate)
                    row[variant], row[f"{variant}_answer_ce"] = accuracy, ce
                else:
                    row[variant] = perplexity(loaded.model, source, length, args.samples, scales, args.seed,
                                              args.batch_size, decimation=decimate, tail=tail)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    cells = [f"{row['task']:>8}", f"{bucket_name(row['length']):>6}"]
    if "base" in row:
        cells.append(f"base {row['base']:.4g}")
    if "bank" in row:
        cells.append(f"bank {row['bank']:.4g} ({row['bucket']})")
    return "  ".join(cells)


def by_task(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each task, tasks and rows in their order."""
    return {task: [r for r in rows if r["task"] == task] for task in dict.fromkeys(r["task"] for r in rows)}


def value_format(task: str):
    return (lambda v: f"{v:.0%}") if task == "passkey" else (lambda v: f"{v:.2f}")


def task_table(task: str, subset: list[dict], corner: str, series: list[tuple[str, str]]) -> list[str]:
    """One task's heading and markdown table: a column per length, a row per (label, row key) of `series`."""
    fmt = value_format(task)
    return [f"**{METRIC[task]}**\n", f"| {corner} | " + " | ".join(bucket_name(r["length"]) for r in subset) + " |",
            "|---" * (len(subset) + 1) + "|",
            *(f"| {label} | " + " | ".join(fmt(r[key]) for r in subset) + " |" for label, key in series)]


def markdown(rows: list[dict]) -> str:
    out = []
    for task, subset in by_task(rows).items():
        variants = [("base model", "base"), ("with bank", "bank")]
        out += task_table(task, subset, "context", [(label, key) for label, key in variants if key in subset[0]])
        if "bank" in subset[0]:
            out.append("| bucket used | " + " | ".join(r["bucket"] for r in subset) + " |")
        tails = {bucket_name(r["length"]): r["tail"] for r in subset if "tail" in r}
        if tails:
            out.append("\n(decimate buckets, base and bank alike: perplexity of the last " + ", ".join(
                f"{n} tokens at {name}" for name, n in tails.items()) + " of each window)")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str, series: list[tuple[str, str]] | None = None) -> None:
    """A panel per task, a line per series (row key, label): by default base and bank."""
    series = series or [("base", "base"), ("bank", "bank")]
    tasks = by_task(rows)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, subset) in zip(axes[0], tasks.items()):
        lengths = [r["length"] for r in subset]
        present = [(key, label) for key, label in series if key in subset[0]]
        for key, label in present:
            ax.plot(lengths, [r[key] for r in subset], "o--" if key == "base" else "s-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [bucket_name(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(METRIC[task])
        values = [r[key] for r in subset for key, _ in present]
        if task == "ppl" and max(values) > 3 * min(values):  # a collapse spans decades; a flat curve does not
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m extend.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--bank")
    p.add_argument("--task", default="passkey,ppl", help="comma-separated: passkey, ppl")
    p.add_argument("--lengths", default="512,1k,2k,4k,8k,16k,32k")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--haystack", choices=("data", "filler"), default="data")
    p.add_argument("--training-length", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--quantize", choices=("int8", "int6"), help="calibrate/evaluate the weight-quantised model")
    p.add_argument("--quantize-embedding", action="store_true")
    args = p.parse_args(argv)
    for task in args.task.split(","):
        if task not in METRIC:
            p.error(f"--task: unknown task {task!r} (known: {', '.join(METRIC)})")
    rows = evaluate(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(rows)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "results.png", f"{Path(args.model).name}: {args.samples} samples per point")
    print("\n" + table)


if __name__ == "__main__":
    main()

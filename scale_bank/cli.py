"""`python -m scale_bank ls|show|verify`: inspect and check a bank. Exit 0 when fine, 1 with the error on stderr.

    python -m scale_bank ls BANK                 one line per bucket: method, calibrator, kept result, metrics
    python -m scale_bank show BANK BUCKET        one entry in full, with per-layer scale statistics
    python -m scale_bank verify BANK [--model DIR]   every check; with a model, also that the bank is for it

Each takes `--json` for machine-readable output on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from runtime import CheckpointError, load_model

from .bank import Bank
from .errors import BankError, UnknownBucketError
from .manifest import BankEntry


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (BankError, UnknownBucketError, CheckpointError) as error:
        if args.json and args.command is _verify:
            print(json.dumps({"ok": False, "error": str(error)}))
        print(f"error: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scale_bank", description="Inspect and verify a scale bank.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, command, help_text in (("ls", _ls, "list the bank's buckets"),
                                     ("show", _show, "show one entry and its per-layer scale statistics"),
                                     ("verify", _verify, "check the whole bank (and, with --model, its model)")):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(command=command)
        sub.add_argument("bank", help="bank directory (holds bank.json)")
        if name == "show":
            sub.add_argument("bucket", help="bucket name, e.g. 8k")
        if name == "verify":
            sub.add_argument("--model", help="checkpoint directory the bank must belong to")
            sub.add_argument("--quantize", choices=("int8", "int6"), help="with --model: the model quantised so")
            sub.add_argument("--quantize-embedding", action="store_true", help="with --quantize: the embedding too")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _ls(args) -> int:
    bank = Bank.load(args.bank)
    if args.json:
        print(json.dumps({"path": str(bank.path), **bank.manifest.to_json()}, indent=2))
        return 0
    print(_describe_model(bank))
    header = ("bucket", "length", "method", "granularity", "calibrator", "chosen", "held-out: identity → chosen")
    rows = [(e.bucket, str(e.length), e.method, e.granularity, e.calibrator["name"], e.chosen, _metrics_line(e))
            for e in bank.manifest.entries]
    print(_table(header, rows) if rows else "(no entries)")
    return 0


def _show(args) -> int:
    bank = Bank.load(args.bank)
    entry = bank.entry(args.bucket)
    scales = bank.scale_sets.get(entry.bucket)
    layers: list[dict[str, Any]] = [] if scales is None else [
        {"layer": i, "shape": list(s.shape), "min": s.min().item(), "mean": s.mean().item(), "max": s.max().item()}
        for i, s in enumerate(scales.layers)]
    if args.json:
        print(json.dumps({"path": str(bank.path), "model": bank.manifest.model, "entry": entry.to_json(),
                          "layers": layers}, indent=2))
        return 0
    print(_describe_model(bank))
    for key, value in entry.to_json().items():
        print(f"{key:>12}  {json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value}")
    if layers:
        rows = [(str(l["layer"]), "x".join(map(str, l["shape"])) or "()", f"{l['min']:.4g}", f"{l['mean']:.4g}",
                 f"{l['max']:.4g}") for l in layers]
        print(_table(("layer", "shape", "min", "mean", "max"), rows))
    return 0


def _verify(args) -> int:
    config = fingerprint = quantization = None
    if args.model is not None:
        loaded = load_model(args.model, quantize=args.quantize, quantize_embedding=args.quantize_embedding)
        config, fingerprint, quantization = loaded.config, loaded.fingerprint, loaded.quantization
    bank = Bank.load(args.bank, config, fingerprint, quantization)
    if args.json:
        print(json.dumps({"ok": True, "path": str(bank.path), "fingerprint": bank.manifest.model["fingerprint"],
                          "model": args.model, "buckets": bank.buckets}))
    else:
        against = f", and it belongs to {args.model}" if args.model else ""
        print(f"ok: {bank.path}: {len(bank.buckets)} entries ({', '.join(bank.buckets) or 'none'}) pass every "
              f"check{against}")
    return 0


def _describe_model(bank: Bank) -> str:
    m = bank.manifest.model
    length = m["training_context_length"]
    trained = f"trained at {length} tokens" if length else "training length unknown"
    return (f"bank {bank.path}: model {m['fingerprint']} ({m['arch']}, {m['n_layer']} layers, {trained}, "
            f"{m['quantization'] or 'unquantised'})")


def _metrics_line(entry: BankEntry) -> str:
    """Each held-out metric the identity and the kept result both report: `ppl 444 → 12.1`."""
    before, after = entry.metrics.get("identity", {}), entry.metrics.get(entry.chosen, {})
    shared = [name for name in before if name in after]
    return "; ".join(f"{name} {before[name]:.4g} → {after[name]:.4g}" for name in shared) or "-"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows))

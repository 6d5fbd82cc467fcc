"""Does a bank help on text it was never calibrated on? Each domain left out of calibration, then evaluated.

    python -m extend.transfer --model DIR \\
        --calibration books=gutenberg/train-01.jsonl.xz,docs=domains/python-docs.jsonl.xz@train,filler \\
        --evaluation books=gutenberg/eval.jsonl.xz,docs=domains/python-docs.jsonl.xz@eval,filler \\
        --buckets 1k,2k,4k,8k --lengths 512,4k,8k --templates all --samples 50 --jobs 6 --out docs/transfer \\
        -- --task passkey --calibrator bp --granularity channel --method a_spectrum --steps 150

Builds a bank on every calibration source (`all`) and, for each calibration source that is also an evaluation
domain, one without it (`without-NAME`), `--jobs` at a time, under OUT/banks/ (an existing bank is resumed).
Then evaluates the base model and the `all` bank on every evaluation domain, and each `without-NAME` bank on
NAME, the domain it never saw. An evaluation domain that no calibration source names is unseen by every bank.
Everything after `--` goes to extend.build_bank as it is. Writes OUT/transfer.json (rows keyed by domain),
transfer.md and transfer.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from scale_bank import bucket_name

from .evaluate import METRIC, by_task, keyed_by_domain, over_templates, plot, value_format
from .jobs import Job, run_jobs
from .passkey import parse_templates
from .sources import FILLER, SourceSpec, parse_mixture, parse_sources

ALL = "all"
SERIES = [("base", "base model"), (ALL, "bank, every domain calibrated"), ("left_out", "bank, domain left out")]


def _argument(spec: SourceSpec) -> str:
    return FILLER if spec.is_filler else f"{spec.name}={spec.describe()}"


def bank_jobs(args, calibration: list[SourceSpec], weights: dict[str, float], left_out: list[str]) -> list[Job]:
    """The `all` bank and one bank without each of `left_out`."""
    jobs = []
    for name in [ALL] + [f"without-{d}" for d in left_out]:
        specs = [s for s in calibration if name == ALL or s.name != name.removeprefix("without-")]
        out = args.out / "banks" / name
        argv = ["--model", str(args.model), "--data", ",".join(map(_argument, specs)), "--mixture",
                ",".join(f"{s.name}={weights[s.name]:g}" for s in specs), "--buckets", args.buckets, "--seed",
                str(args.seed), "--out", str(out), "--resume", "--no-progress", "--device", args.device,
                *args.build_bank_args]
        jobs.append(Job(name, "extend.build_bank", argv, args.out / "banks" / f"{name}.log"))
    return jobs


def evaluation_jobs(args, evaluation: list[SourceSpec], left_out: list[str]) -> list[Job]:
    """Base and `all` bank on each domain; each `without-NAME` bank on NAME, bank only."""
    jobs = []
    for spec in evaluation:
        runs = [(ALL, True)] + ([(f"without-{spec.name}", False)] if spec.name in left_out else [])
        for bank, with_base in runs:
            out = args.out / "eval" / bank / spec.name
            argv = ["--model", str(args.model), "--bank", str(args.out / "banks" / bank), "--data", _argument(spec),
                    "--task", args.task, "--lengths", args.lengths, "--templates", args.templates, "--samples",
                    str(args.samples), "--batch-size", str(args.eval_batch_size), "--seed", str(args.seed),
                    "--device", args.device, "--out", str(out)] + ([] if with_base else ["--no-base"])
            jobs.append(Job(f"{bank}/{spec.name}", "extend.evaluate", argv, out.parent / f"{spec.name}.log"))
    return jobs


def gather(args, evaluation: list[SourceSpec], left_out: list[str]) -> list[dict]:
    """Rows {domain, task, length, [template], base, all, [left_out]} from the evaluations' results."""
    rows = []
    for spec in evaluation:
        [scored] = json.loads((args.out / "eval" / ALL / spec.name / "results.json").read_text()).values()
        left = None
        if spec.name in left_out:
            [left] = json.loads((args.out / "eval" / f"without-{spec.name}" / spec.name /
                                 "results.json").read_text()).values()
        for index, r in enumerate(scored):
            row = {"domain": spec.name, **{k: r[k] for k in ("task", "length", "template") if k in r},
                   "base": r["base"], ALL: r["bank"], "bucket": r["bucket"]}
            if left is not None:
                row["left_out"] = left[index]["bank"]
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """Per task, a row per domain and series, a column per length; passkey: the mean over templates, then the
    lowest template."""
    out = []
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    header = ["| domain | " + " | ".join(bucket_name(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for task, subset in by_task(rows).items():
        fmt = value_format(task)
        summaries = [("", statistics.fmean)] if task == "ppl" else [(", mean over templates", statistics.fmean),
                                                                   (", lowest template", min)]
        for heading, summary in summaries:
            out += [f"**{METRIC[task]}{heading}**\n", *header]
            for domain in domains:
                mine = [r for r in subset if r["domain"] == domain]
                for key, label in SERIES:
                    if mine and key in mine[0]:
                        values = over_templates(mine, key, summary)
                        out.append(f"| {domain}: {label} | " + " | ".join(
                            fmt(values[domain, task, n]) if (domain, task, n) in values else "–"
                            for n in lengths) + " |")
            out.append("")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    build_bank_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m extend.transfer", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--calibration", nargs="+", required=True, help="calibration sources (extend.sources)")
    p.add_argument("--evaluation", nargs="+", required=True,
                   help="evaluation domains, by the same names as the calibration sources they are left out of")
    p.add_argument("--mixture", help="calibration weight per source (default 1 each)")
    p.add_argument("--buckets", default="1k,2k,4k,8k")
    p.add_argument("--lengths", default="512,4k,8k")
    p.add_argument("--task", default="passkey,ppl")
    p.add_argument("--templates", default="all")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--eval-batch-size", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="banks built, then evaluations run, this many at once")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.build_bank_args = build_bank_args
    try:
        calibration, evaluation = parse_sources(args.calibration), parse_sources(args.evaluation)
        weights = parse_mixture(args.mixture, calibration)
        parse_templates(args.templates)
    except ValueError as error:
        p.error(str(error))
    if args.jobs < 1:
        p.error(f"--jobs: must be at least 1, got {args.jobs}")
    names = {s.name for s in evaluation}
    left_out = [s.name for s in calibration if s.name in names]
    if len(calibration) < 2:
        p.error("--calibration: leaving a domain out needs at least two sources")
    for stage, jobs in (("building", bank_jobs(args, calibration, weights, left_out)),
                        ("evaluating", evaluation_jobs(args, evaluation, left_out))):
        failed = run_jobs(jobs, args.jobs)
        if failed:
            logs = {job.name: job.log for job in jobs}
            raise SystemExit(f"extend.transfer: {stage} {', '.join(failed)} failed (see "
                             + ", ".join(str(logs[name]) for name in failed) + ")")
    rows = gather(args, evaluation, left_out)
    (args.out / "transfer.json").write_text(json.dumps(keyed_by_domain(rows), indent=1) + "\n")
    table = markdown(rows)
    (args.out / "transfer.md").write_text(table)
    plot(rows, args.out / "transfer.png", f"{args.model.name}: each domain left out of calibration, "
                                          f"{args.samples} samples per point", SERIES)
    print("\n" + table)


if __name__ == "__main__":
    main()

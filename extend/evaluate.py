"""Evaluate a model with and without its bank over context lengths, per domain and template: tables and a plot.

    python -m extend.evaluate --model DIR --bank BANK --task passkey,ppl --lengths 512,1k,2k,4k,8k,16k,32k \
        --data books=gutenberg/eval.jsonl.xz,docs=domains/python-docs.jsonl.xz@eval,filler \
        --templates all --samples 50 --out results/

`--data` names the domains (extend.sources; evaluate on `@eval` parts, calibrate on `@train`): passkey
accuracy is measured in each domain's text as haystack, in every template of `--templates`; perplexity on each
domain's text (the filler has none). Writes `results.json` (rows keyed by domain), `results.md` and
`results.png` (a line per domain) under --out and prints the table. The bank's scales are chosen per length
exactly as the server chooses them (scale_bank.select with n = the length). A decimate bucket decimates the
prefill; its perplexity, and the base model's beside it, is then that of the last `keep_last` tokens of each
window (the positions a decimation keeps in place), and the row says so (`tail`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from runtime import load_model  # noqa: E402
from runtime.tokenizer import find_tokenizer  # noqa: E402
from scale_bank import Bank, bucket_name, parse_buckets, select  # noqa: E402

from .objectives import passkey_accuracy, perplexity  # noqa: E402
from .passkey import parse_templates  # noqa: E402
from .sources import Domain, parse_sources, read_source  # noqa: E402

METRIC = {"passkey": "passkey accuracy", "ppl": "perplexity"}
LINE_STYLES = [dict(linestyle="-", marker="s"), dict(linestyle=":", marker="^"), dict(linestyle="-.", marker="d")]


def evaluate(args, base: bool = True) -> list[dict]:
    """Rows {domain, length, task, [template], bucket, base, bank, …}; without `base`, only the bank's values."""
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                        quantize=args.quantize, quantize_embedding=args.quantize_embedding)
    tokenizer = find_tokenizer(args.model, args.tokenizer)
    bank = Bank.load(args.bank, loaded.config, loaded.fingerprint, loaded.quantization) if args.bank else None
    domains = [Domain.of(spec.name, read_source(spec), tokenizer) for spec in parse_sources(args.data)]
    templates = parse_templates(args.templates)
    training_length = args.training_length or loaded.config.training_context_length
    # length -> what the server would choose: the same for every domain
    choices = {length: select(bank, length, "auto", training_length) for length in parse_buckets(args.lengths)}
    rows = []
    for domain in domains:
        for length, choice in choices.items():
            decimation = choice.extension.decimation
            variants = ({"base": (None, None)} if base else {}) | (
                {"bank": (choice.extension.scales, decimation)} if bank is not None else {})
            tail = None if decimation is None else decimation.keep_last
            for task in args.task.split(","):
                if task == "ppl" and domain.text is None:
                    continue  # the filler is a haystack only
                for template in templates if task == "passkey" else [None]:
                    row = {"domain": domain.name, "length": length, "task": task, "bucket": choice.name}
                    if template is not None:
                        row["template"] = template.name
                    if task == "ppl" and tail is not None:
                        row["tail"] = tail
                    for variant, (scales, decimate) in variants.items():
                        if task == "passkey":
                            accuracy, ce = passkey_accuracy(loaded.model, tokenizer, domain.haystack, length,
                                                            args.samples, scales, args.seed, args.batch_size,
                                                            decimation=decimate, template=template)
                            row[variant], row[f"{variant}_answer_ce"] = accuracy, ce
                        else:
                            assert domain.text is not None  # the filler's perplexity rows are skipped above
                            row[variant] = perplexity(loaded.model, domain.text, length, args.samples, scales,
                                                      args.seed, args.batch_size, decimation=decimate, tail=tail)
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    cells = [f"{row['domain']:>8}", f"{row['task']:>8}", f"{row.get('template', ''):>10}",
             f"{bucket_name(row['length']):>6}"]
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


def over_templates(rows: list[dict], key: str, summary=statistics.fmean) -> dict[tuple[str, str, int], float]:
    """{(domain, task, length): summary (default: the mean) of row[key] over the rows' templates}, where rows have
    `key`."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in filter(lambda r: key in r, rows):
        groups.setdefault((r.get("domain", ""), r["task"], r["length"]), []).append(r[key])
    return {k: summary(v) for k, v in groups.items()}


def _domain_tables(rows: list[dict]) -> list[str]:
    """One section: per task, a row per variant (and template), a column per length."""
    out = []
    for task, subset in by_task(rows).items():
        by_template: dict[str | None, list[dict]] = {}
        for r in subset:
            by_template.setdefault(r.get("template"), []).append(r)
        columns = next(iter(by_template.values()))
        fmt = value_format(task)
        out += task_table(task, columns, "context", [])
        for label, key in (("base model", "base"), ("with bank", "bank")):
            for template, cells in by_template.items():
                if key in cells[0]:
                    named = label if len(by_template) == 1 else f"{label}, {template}"
                    out.append(f"| {named} | " + " | ".join(fmt(r[key]) for r in cells) + " |")
        if "bank" in columns[0]:
            out.append("| bucket used | " + " | ".join(r["bucket"] for r in columns) + " |")
        tails = {bucket_name(r["length"]): r["tail"] for r in subset if "tail" in r}
        if tails:
            out.append("\n(decimate buckets, base and bank alike: perplexity of the last " + ", ".join(
                f"{n} tokens at {name}" for name, n in tails.items()) + " of each window)")
        out.append("")
    return out


def _overview(rows: list[dict]) -> list[str]:
    """Per task, a row per domain and variant (passkey: the mean over templates), a column per length."""
    out = []
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    for task in by_task(rows):
        fmt = value_format(task)
        out += [f"**{METRIC[task]}, by domain**" + (" (mean over templates)" if task == "passkey" else "") + "\n",
                "| domain | " + " | ".join(bucket_name(n) for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for key, label in (("base", "base"), ("bank", "bank")):
            if key not in rows[0]:
                continue
            means = over_templates([r for r in rows if r["task"] == task], key)
            for domain in domains:
                if (domain, task, lengths[0]) in means:
                    out.append(f"| {domain}, {label} | " + " | ".join(
                        fmt(means[domain, task, n]) if (domain, task, n) in means else "–" for n in lengths) + " |")
        out.append("")
    return out


def markdown(rows: list[dict]) -> str:
    """An overview by domain (when there are several), then each domain's tables."""
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    if len(domains) == 1:
        return "\n".join(_domain_tables(rows))
    out = _overview(rows)
    for domain in domains:
        out += [f"### {domain}\n", *_domain_tables([r for r in rows if r["domain"] == domain])]
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str, series: list[tuple[str, str]] | None = None) -> None:
    """A panel per task, a line per domain and series (row key, label; by default base and bank), passkey
    accuracy averaged over templates: one colour per domain, the base dashed."""
    series = series or [("base", "base"), ("bank", "bank")]
    tasks = by_task(rows)
    domains = list(dict.fromkeys(r.get("domain", "") for r in rows))
    many = len(domains) > 2  # then one legend beside the last panel, not over the lines
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks) + 3 * many, 4 + many), squeeze=False)
    for ax, (task, subset) in zip(axes[0], tasks.items()):
        lengths = list(dict.fromkeys(r["length"] for r in subset))
        present = [(key, label) for key, label in series if any(key in r for r in subset)]
        plotted = []
        for index, domain in enumerate(domains):
            for number, (key, label) in enumerate(present):
                means = over_templates([r for r in subset if r.get("domain", "") == domain], key)
                points = [(n, means[domain, task, n]) for n in lengths if (domain, task, n) in means]
                if not points:
                    continue
                style = dict(linestyle="--", marker="o") if key == "base" else LINE_STYLES[
                    [k for k, _ in present if k != "base"].index(key) % len(LINE_STYLES)]
                colour = f"C{index}" if len(domains) > 1 else f"C{number}"
                ax.plot(*zip(*points), color=colour, label=f"{domain}, {label}" if len(domains) > 1 else label,
                        **style)
                plotted += [v for _, v in points]
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [bucket_name(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(METRIC[task])
        if task == "ppl" and max(plotted) > 3 * min(plotted):  # a collapse spans decades; a flat curve does not
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if not many:
            ax.legend()
    if many:  # every panel's lines, once each (the filler has no perplexity line)
        entries = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
        axes[0][-1].legend(entries.values(), entries.keys(), fontsize="small", loc="upper left",
                           bbox_to_anchor=(1.02, 1))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def keyed_by_domain(rows: list[dict]) -> dict[str, list[dict]]:
    """{domain: its rows, without the domain key}: results.json's layout."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["domain"], []).append({k: v for k, v in r.items() if k != "domain"})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m extend.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--bank")
    p.add_argument("--task", default="passkey,ppl", help="comma-separated: passkey, ppl")
    p.add_argument("--lengths", default="512,1k,2k,4k,8k,16k,32k")
    p.add_argument("--data", nargs="+", required=True,
                   help="domains: .txt/.jsonl/.jsonl.xz files or folders, NAME=PATH[@train|@eval], filler")
    p.add_argument("--templates", default="line", help="passkey templates (comma-separated, or all)")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-base", action="store_true", help="score the bank only, not the base model beside it")
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
    try:
        parse_sources(args.data)
        parse_templates(args.templates)
    except ValueError as error:
        p.error(str(error))
    rows = evaluate(args, base=not args.no_base)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(keyed_by_domain(rows), indent=1) + "\n")
    table = markdown(rows)
    (args.out / "results.md").write_text(table)
    plot(rows, args.out / "results.png", f"{Path(args.model).name}: {args.samples} samples per point")
    print("\n" + table)


if __name__ == "__main__":
    main()

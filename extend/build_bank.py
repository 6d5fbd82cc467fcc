"""Build a bank of calibrated scale sets, one per context-length bucket.

    python -m extend.build_bank --model DIR --buckets 4k,8k,16k,32k,64k --task passkey --calibrator bp \
        --granularity channel --method delta --data BOOKS... --out BANK [--resume]

For each bucket, shortest first: calibrate on the calibration documents at the bucket length, starting
from the previous bucket's scales (a curriculum: calibrating a long bucket from identity learns little);
score identity, the previous bucket's scales and the new ones on the held-out documents; keep the best
(never worse than identity) and record all three in the manifest. Each finished bucket is written at once,
so `--resume` carries on after an interruption.

    python -m extend.build_bank ... --data books=train-01.jsonl.xz,docs=python-docs.jsonl.xz@train,filler \
        --mixture books=2,docs=1,filler=1 --templates line,inline

`--data` names text sources (extend.sources): calibration batches draw each sample's haystack (and the
perplexity hinge its windows) from a source chosen by the `--mixture` weights, and in a template drawn from
`--templates`. Each source's documents are split into calibration and held-out halves; every source is a
held-out domain, and a bucket keeps scales only if no domain is worse than identity (scoring.HELD_OUT_RULE).

    python -m extend.build_bank --model DIR --buckets 4k,8k --task passkey --method decimate \
        [--decimate-layers 10,12,14] [--decimate-l-base 2048] --data BOOKS... --out BANK

`--method decimate` (DeciMamba, training-free) calibrates nothing: per bucket it sweeps the candidate
layers on the calibration documents and keeps the best one if it beats identity on the held-out ones
(extend.decimate); the sweep's scores go into the entry's `calibrator` record.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from runtime import MAMBA1, MAMBA2, Decimation, LoadedModel, MambaLM, ScaleMethod, ScaleSet, __version__, load_model
from runtime.errors import RuntimeErrorBase
from runtime.tokenizer import Tokenizer, find_tokenizer
from scale_bank import Bank, BankEntry, BankError, bucket_name, model_info, parse_buckets

from . import distributed
from .calibrate import CalibrationResult, calibrate_bp, calibrate_zo
from .data import DataError, DataSplit
from .decimate import sweep_and_choose
from .losses import Objective, language_model_objective, passkey_objective
from .passkey import Template, parse_templates
from .scoring import HELD_OUT_RULE, HeldOut, choose, score_domains
from .sources import Domain, Haystack, Mixture, SourceSpec, parse_mixture, parse_sources, read_source
from .tokens import TokenSource

log = logging.getLogger("extend.build_bank")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m extend.build_bank", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in the model directory)")
    p.add_argument("--buckets", required=True, help="comma-separated lengths, e.g. 4k,8k,16k,32k,64k")
    p.add_argument("--task", choices=("ppl", "passkey"), default="ppl")
    p.add_argument("--calibrator", choices=("zo", "bp"), help="delta and a_spectrum (default zo)")
    p.add_argument("--granularity", choices=("layer", "channel", "head", "channel_state"),
                   help="delta and a_spectrum (default layer)")
    p.add_argument("--method", choices=("delta", "a_spectrum", "decimate"), default="delta")
    p.add_argument("--decimate-layers", type=_layer_list,
                   help="decimate: candidate layers, e.g. 8,10,12 (default: all but the last)")
    p.add_argument("--decimate-l-base", type=int,
                   help="decimate: L_base, tokens the later layers keep (default: the training length)")
    p.add_argument("--decimate-keep-last", type=int, help="decimate: last prompt tokens always kept (default 64)")
    p.add_argument("--decimate-min-len", type=int, help="decimate: fewest tokens kept before those (default 0)")
    p.add_argument("--data", nargs="+", required=True,
                   help="text sources: .txt/.jsonl/.jsonl.xz files or folders, NAME=PATH[@train|@eval], filler")
    p.add_argument("--mixture", help="calibration weight per source, e.g. books=2,docs=1 (default: 1 each)")
    p.add_argument("--templates", default="line",
                   help="passkey templates calibration samples are drawn in (comma-separated, or all)")
    p.add_argument("--out", required=True, type=Path, help="bank directory (created, or resumed)")
    p.add_argument("--resume", action="store_true", help="keep the buckets already in --out and build the rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out-fraction", type=float, default=0.5)
    p.add_argument("--steps", type=int, help="calibration steps (ZO default 50, BP 200)")
    p.add_argument("--lr", type=float, help="ZO η (default 0.001) or BP Adam lr (default 0.05)")
    p.add_argument("--c", type=float, default=0.1, help="ZO perturbation size")
    p.add_argument("--batch-size", type=int, default=4, help="samples per calibration step (over all ranks)")
    p.add_argument("--micro-batch-size", type=int,
                   help="samples a rank runs at once; a step's gradient is accumulated over them (default: all)")
    p.add_argument("--no-recompute", action="store_true",
                   help="BP: keep every layer's activations for the backward pass instead of recomputing them "
                        "(one forward pass less a step; memory grows with micro-batch x length)")
    p.add_argument("--eval-samples", type=int, default=20, help="held-out samples per candidate and bucket")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--init", choices=("previous", "identity"), default="previous",
                   help="start each bucket from the previous bucket's scales, or from identity")
    p.add_argument("--ppl-weight", type=float, default=10.0,
                   help="passkey task: weight of the perplexity hinge (0: retrieval alone)")
    p.add_argument("--ppl-slack", type=float, default=0.02,
                   help="passkey task: relative perplexity increase the hinge lets pass free")
    p.add_argument("--training-length", type=int, help="the model's training context (if its config lacks it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--quantize", choices=("int8", "int6"), help="calibrate/evaluate the weight-quantised model")
    p.add_argument("--quantize-embedding", action="store_true")
    p.add_argument("--log", type=Path, help="log file (default: BANK/build.log)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    decimate_flags = ("decimate_layers", "decimate_l_base", "decimate_keep_last", "decimate_min_len")
    if args.method == "decimate":
        if args.calibrator or args.granularity:
            p.error("--method decimate calibrates nothing (it sweeps --decimate-layers): leave out --calibrator "
                    "and --granularity")
        args.granularity = "none"
        args.decimate_keep_last = 64 if args.decimate_keep_last is None else args.decimate_keep_last
        args.decimate_min_len = args.decimate_min_len or 0
        return args
    given = [f"--{name.replace('_', '-')}" for name in decimate_flags if getattr(args, name) is not None]
    if given:
        p.error(f"{', '.join(given)}: only for --method decimate")
    args.calibrator, args.granularity = args.calibrator or "zo", args.granularity or "layer"
    if args.calibrator == "zo" and args.granularity != "layer":
        p.error("--calibrator zo calibrates one scale per layer: use --granularity layer")
    return args


def _layer_list(text: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _open_bank(args: argparse.Namespace, loaded: LoadedModel) -> Bank:
    info = model_info(loaded.config, loaded.fingerprint, loaded.quantization)
    if args.training_length:
        info["training_context_length"] = args.training_length
    if (args.out / "bank.json").exists():
        if not args.resume:
            raise BankError(args.out, "a bank is already there; pass --resume to complete it, or choose another --out")
        return Bank.load(args.out, loaded.config, loaded.fingerprint, loaded.quantization)
    return Bank.create(args.out, info)


def _shared_bank(args: argparse.Namespace, loaded: LoadedModel) -> Bank:
    """The bank every rank adds to: rank 0 alone creates (or resumes) and writes it, the others read it."""
    bank = _open_bank(args, loaded) if distributed.is_main() else None
    distributed.barrier()
    return bank or Bank.load(args.out, loaded.config, loaded.fingerprint, loaded.quantization)


@dataclass
class CalibrationData:
    """Every source split by document into a calibration and a held-out part (the filler is both)."""

    calibration: Mixture
    held_out: dict[str, Domain]
    record: dict  # the manifest's {"calibration": [...], "held_out": [...]}
    sources: dict  # the manifest's {name: {"data": spec, "weight": w}}

    @classmethod
    def of(cls, specs: list[SourceSpec], weights: dict[str, float], tokenizer: Tokenizer, seed: int,
           held_out_fraction: float) -> CalibrationData:
        calibration, held_out = [], {}
        record: dict[str, list[dict]] = {"calibration": [], "held_out": []}
        for spec in specs:
            docs = read_source(spec)
            split = DataSplit.of(docs, seed, held_out_fraction) if docs else DataSplit([], [], seed)
            calibration.append(Domain.of(spec.name, split.calibration, tokenizer))
            held_out[spec.name] = Domain.of(spec.name, split.held_out, tokenizer)
            for part in record:
                record[part] += split.record[part]
        sources = {spec.name: {"data": spec.describe(), "weight": weights[spec.name]} for spec in specs}
        return cls(Mixture(calibration, weights), held_out, record, sources)


@dataclass(frozen=True)
class BuildInputs:
    """What every bucket's job reads."""

    args: argparse.Namespace
    model: MambaLM
    tokenizer: Tokenizer
    data: CalibrationData
    templates: list[Template]
    granularity: str  # as calibrated: a Mamba2's "channel" scales are per head

    def scoring(self, source: Mixture | TokenSource | None, haystack: Haystack) -> HeldOut:
        """What scoring reads from `source` and `haystack`, with the sample budget of the arguments."""
        args = self.args
        return HeldOut(source, self.tokenizer, haystack, args.eval_samples, args.seed, args.eval_batch_size)


# (bucket name, length, the scales served for the bucket before, start time) -> the entry and its scales
BucketJob = Callable[[str, int, ScaleSet | None, float], tuple[BankEntry, ScaleSet | None]]


def _granularity(asked: str, arch: str) -> str:
    """The granularity calibrated for `asked`: Mamba2's Δ is per head, so its "channel" scales are per head."""
    if arch == MAMBA2 and asked == "channel":
        return "head"
    if arch == MAMBA1 and asked == "head":
        raise ValueError("--granularity head is for Mamba2 models; Mamba1 scales are per channel")
    return asked


def _served(bank: Bank, name: str) -> ScaleSet | None:
    """What the server applies for bucket `name`: None when the entry kept identity."""
    entry = bank.entry(name)
    return None if entry.chosen == "identity" else bank.scale_set(name)


def _start(inputs: BuildInputs, previous: ScaleSet | None) -> ScaleSet:
    """The scales calibration starts from: the previous bucket's (--init previous) where they fit, or identity."""
    granularity = "channel" if inputs.granularity == "head" else inputs.granularity
    identity = ScaleSet.identity(inputs.model.config, ScaleMethod(inputs.args.method), granularity)
    if inputs.args.init == "previous" and previous is not None and previous.method is identity.method and all(
            p.shape == i.shape for p, i in zip(previous.layers, identity.layers)):
        return previous
    return identity


def _cost(started: float, device: torch.device) -> dict:
    """Seconds since `started` and, on CUDA, the peak memory since the last reset."""
    cost = {"seconds": round(time.perf_counter() - started, 1)}
    if device.type == "cuda":
        cost["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return cost


def _metrics_text(metrics: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{k} {', '.join(f'{m} {v:.4g}' for m, v in vals.items())}" for k, vals in metrics.items())


def _objective(inputs: BuildInputs, length: int) -> Objective:
    args, data = inputs.args, inputs.data
    if args.task == "ppl":
        return language_model_objective(inputs.model, data.calibration, length, args.batch_size, args.seed,
                                        checkpoint=not args.no_recompute, micro_batch=args.micro_batch_size)
    return passkey_objective(inputs.model, inputs.tokenizer, data.calibration.haystack, length, args.batch_size,
                             args.seed, text=data.calibration, ppl_weight=args.ppl_weight, ppl_slack=args.ppl_slack,
                             templates=inputs.templates, checkpoint=not args.no_recompute,
                             micro_batch=args.micro_batch_size)


def _calibrate(args: argparse.Namespace, objective: Objective, init: ScaleSet) -> CalibrationResult:
    progress = not args.no_progress and distributed.is_main()
    if args.calibrator == "zo":
        return calibrate_zo(objective, init, args.steps or 50, args.lr or 0.001, args.c, args.seed, progress)
    return calibrate_bp(objective, init, args.steps or 200, args.lr or 0.05, progress)


def _calibrated_entry(inputs: BuildInputs, held_out: dict[str, HeldOut], name: str, length: int,
                      previous: ScaleSet | None, started: float) -> tuple[BankEntry, ScaleSet]:
    """Calibrates bucket `name` from `previous` (or identity) and keeps the best of identity, `previous` and
    the new scales on the held-out documents."""
    args, model = inputs.args, inputs.model
    objective = _objective(inputs, length)
    init = _start(inputs, previous)
    result = _calibrate(args, objective, init)
    cost = _cost(started, model.device)
    candidates = {"identity": None, "calibrated": result.scales}
    if previous is not None:
        candidates["previous"] = previous
    metrics = {key: score_domains(model, args.task, length, scales, held_out) for key, scales in candidates.items()}
    chosen = distributed.from_main(choose(args.task, metrics))  # one decision, whatever a rank's last bits
    kept = candidates[chosen] or ScaleSet(init.method, tuple(torch.ones_like(layer) for layer in init.layers))
    passkey = {"ppl_weight": args.ppl_weight, "ppl_slack": args.ppl_slack,
               "templates": [t.name for t in inputs.templates]} if args.task == "passkey" else {}
    entry = BankEntry(
        bucket=name, length=length, method=args.method, granularity=inputs.granularity, version=__version__,
        calibrator={**result.hyper, "init": "previous" if init is previous else "identity",
                    "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size or args.batch_size,
                    "world_size": distributed.world_size(), "task": args.task, "final_loss": result.losses[-1],
                    **cost, **passkey, "sources": inputs.data.sources, "held_out_rule": HELD_OUT_RULE},
        seed=args.seed, data=inputs.data.record, metrics=metrics, chosen=chosen,
    )
    log.info("bucket %s: calibrated in %s; kept %s; held-out %s", name, cost, chosen, _metrics_text(metrics))
    return entry, kept


@dataclass(frozen=True)
class DecimateSweep:
    """What every bucket's layer sweep shares: the decimation it varies the layer of, the candidate layers,
    and the documents it sweeps on and judges the best layer on."""

    template: Decimation
    layers: list[int]
    calibration: HeldOut
    held_out: HeldOut

    @classmethod
    def of(cls, inputs: BuildInputs) -> DecimateSweep:
        args, config, data = inputs.args, inputs.model.config, inputs.data
        l_base = args.decimate_l_base if args.decimate_l_base is not None else (
            args.training_length or config.training_context_length)
        if l_base is None:
            raise ValueError("--method decimate needs L_base: pass --decimate-l-base or --training-length")
        # Decimating after the last layer would only drop outputs nobody reads: the same as identity.
        layers = args.decimate_layers or list(range(config.n_layer - 1))
        if not layers:
            raise ValueError(f"--method decimate: a {config.n_layer}-layer model has no layer with one after it")
        for layer in layers:
            template = Decimation(layer, l_base, args.decimate_min_len, args.decimate_keep_last)
            template.check(config.n_layer)
        held_out = Mixture(list(data.held_out.values()), data.calibration.weights)
        return cls(template, layers, inputs.scoring(data.calibration, data.calibration.haystack),
                   inputs.scoring(held_out, held_out.haystack))


def _decimate_entry(inputs: BuildInputs, sweep: DecimateSweep, name: str, length: int, _previous: ScaleSet | None,
                    started: float) -> tuple[BankEntry, None]:
    """Sweeps the decimating layer for bucket `name` and keeps the best layer if it beats identity."""
    args, model, template = inputs.args, inputs.model, sweep.template
    if not template.drops(length - 1):
        log.warning("bucket %s: decimation drops nothing from %d tokens (L_base %d + keep_last %d cover them): "
                    "every layer scores as identity", name, length, template.l_base, template.keep_last)
    result = sweep_and_choose(model, args.task, length, sweep.layers, template, sweep.calibration, sweep.held_out)
    cost = _cost(started, model.device)
    log.info("bucket %s: swept layers %s in %s; best layer %d; kept %s; held-out %s", name, sweep.layers, cost,
             result.decimation.layer, result.chosen, _metrics_text(result.metrics))
    entry = BankEntry(
        bucket=name, length=length, method="decimate", granularity="none", version=__version__,
        params=result.decimation.to_params(),
        calibrator={"name": "layer_sweep", "task": args.task, "layers": sweep.layers, "samples": args.eval_samples,
                    "ppl_tail": template.keep_last, "sweep": result.sweep, **cost},
        seed=args.seed, data=inputs.data.record, metrics=result.metrics, chosen=result.chosen,
    )
    return entry, None


def _fill(bank: Bank, buckets: str, device: torch.device, job: BucketJob) -> Bank:
    """Adds an entry made by `job` for every bucket the bank lacks, shortest first; each starts from the scales
    the bank serves for the one before."""
    previous: ScaleSet | None = None
    for length in parse_buckets(buckets):
        name = bucket_name(length)
        if name in bank.buckets:
            log.info("bucket %s: already in the bank, kept (--resume)", name)
            previous = _served(bank, name)
        else:
            started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            entry, scales = job(name, length, previous, started)
            if distributed.is_main():
                bank.add_entry(entry, scales)
            previous = None if entry.chosen == "identity" else scales
    return bank


def build(args: argparse.Namespace, device: torch.device) -> Bank:
    loaded = load_model(args.model, device=str(device), dtype=args.dtype, backend=args.backend,
                        quantize=args.quantize, quantize_embedding=args.quantize_embedding)
    tokenizer = find_tokenizer(args.model, args.tokenizer)
    specs = parse_sources(args.data)
    data = CalibrationData.of(specs, parse_mixture(args.mixture, specs), tokenizer, args.seed,
                              args.held_out_fraction)
    inputs = BuildInputs(args, loaded.model, tokenizer, data, parse_templates(args.templates),
                         _granularity(args.granularity, loaded.config.arch))
    bank = _shared_bank(args, loaded)
    log.info("model %s (%s), fingerprint %s; sources %s; %d calibration and %d held-out documents; bank %s",
             args.model, loaded.config.arch, loaded.fingerprint, ", ".join(
                 f"{k}={v['data']} (weight {v['weight']:g})" for k, v in data.sources.items()),
             sum(len(f["documents"]) for f in data.record["calibration"]),
             sum(len(f["documents"]) for f in data.record["held_out"]), args.out)
    if args.method == "decimate":
        job: BucketJob = partial(_decimate_entry, inputs, DecimateSweep.of(inputs))
    else:
        held_out = {name: inputs.scoring(domain.text, domain.haystack) for name, domain in data.held_out.items()}
        job = partial(_calibrated_entry, inputs, held_out)
    return _fill(bank, args.buckets, device, job)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank_device = distributed.start(torch.device(args.device).type)  # torchrun on CUDA: one GPU a rank
    device = torch.device(args.device) if rank_device is None else rank_device
    if distributed.is_main():
        args.out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler()] + (
        [logging.FileHandler(args.log or args.out / "build.log")] if distributed.is_main() else [])
    prefix = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    for handler in handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if distributed.is_main() else logging.WARNING)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        bank = build(args, device)
    except (RuntimeErrorBase, BankError, DataError, ValueError) as error:
        log.error("%s", error)
        return 2
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        distributed.stop()
    if distributed.is_main():
        print(f"bank {args.out}: {', '.join(bank.buckets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

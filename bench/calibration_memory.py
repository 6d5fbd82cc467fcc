"""Peak memory of one BP calibration step at long lengths, and what micro-batches cost, on random real-shaped models.

    python -m bench.calibration_memory --shapes 130m,1.4b,2.8b,mamba2-780m,mamba2-2.7b --lengths 16k,32k,64k
    python -m bench.calibration_memory --shapes 130m --lengths 4k --equivalence 8

Per shape and length: one step of the passkey objective (A-spectrum scales per channel, Mamba2 per head; filler
haystack; per-layer recomputation on, as build_bank runs it) at micro-batch 1, its time and peak accelerator
memory, or "out of memory". With `--equivalence B`: BP_STEPS steps of batch B at once against the same steps in
micro-batches of 1, in turns, their times and the largest relative difference of the scales. Weights are
random (mamba_ssm's initialisation for Mamba1, the runtime's default for Mamba2), in the dtype build_bank
uses on the device unless `--dtype` says otherwise.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from extend.calibrate import calibrate_bp
from extend.losses import passkey_objective
from extend.passkey import filler_haystack
from runtime import MAMBA1, MAMBA2, MambaLM, ModelConfig, ScaleMethod, ScaleSet
from runtime.backend import select_backend
from runtime.init_weights import init_weights
from runtime.loader import resolve_dtype
from runtime.tokenizer import Tokenizer
from scale_bank import parse_buckets

from .report import print_row, save_json

SHAPES = {  # arch, d_model, n_layer of the state-spaces checkpoints
    "130m": (MAMBA1, 768, 24), "1.4b": (MAMBA1, 2048, 48), "2.8b": (MAMBA1, 2560, 64),
    "mamba2-780m": (MAMBA2, 1536, 48), "mamba2-2.7b": (MAMBA2, 2560, 64),
}
TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "mamba-extend-default" / "tokenizer.json"
BP_STEPS = 3


def random_model(shape: str, device: torch.device, dtype: str | None) -> MambaLM:
    arch, d_model, n_layer = SHAPES[shape]
    config = ModelConfig(arch=arch, d_model=d_model, n_layer=n_layer, vocab_size=50288,
                         d_state=16 if arch == MAMBA1 else 128, training_context_length=2048)
    with torch.device(device):
        model = MambaLM(config, select_backend("auto", device))
    if arch == MAMBA1:
        init_weights(model, seed=0)
    model.to(resolve_dtype(dtype, device)).requires_grad_(False)
    return model


def identity(model: MambaLM) -> ScaleSet:
    return ScaleSet.identity(model.config, ScaleMethod.A_SPECTRUM, "channel")


def one_step(model: MambaLM, tokenizer: Tokenizer, length: int, batch: int, micro_batch: int | None,
             steps: int = 1) -> tuple[float, float, ScaleSet]:
    """(seconds, peak GiB, scales) of `steps` BP steps of the passkey objective."""
    objective = passkey_objective(model, tokenizer, filler_haystack(tokenizer), length, batch, seed=0,
                                  micro_batch=micro_batch)
    device = model.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result = calibrate_bp(objective, identity(model), steps=steps, lr=0.05, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return time.perf_counter() - started, peak, result.scales


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.calibration_memory", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="130m,1.4b,2.8b,mamba2-780m,mamba2-2.7b")
    p.add_argument("--lengths", default="16k,32k,64k")
    p.add_argument("--equivalence", type=int, metavar="B", help="also compare batch B at once with micro-batches of 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="the weights' dtype (default: build_bank's on the device); float32 separates "
                   "the batching's own effect on the scales from bfloat16's rounding")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device, tokenizer = torch.device(args.device), Tokenizer(TOKENIZER)
    random.seed(0)
    rows = []
    for shape in args.shapes.split(","):
        model = random_model(shape, device, args.dtype)
        for length in parse_buckets(args.lengths):
            row = {"shape": shape, "length": length}
            try:
                row["seconds"], row["peak_gib"], _ = one_step(model, tokenizer, length, 1, 1)
            except torch.OutOfMemoryError:
                row["seconds"] = row["peak_gib"] = "out of memory"
            if args.equivalence:
                timings = {"whole": [], "micro": []}
                scales = {}
                for _ in range(2):  # in turns, so the machine's drift does not land on one of them
                    for key, micro in (("whole", None), ("micro", 1)):
                        seconds, _, scales[key] = one_step(model, tokenizer, length, args.equivalence, micro,
                                                           BP_STEPS)
                        timings[key].append(seconds)
                row["whole_s"], row["micro_s"] = min(timings["whole"]), min(timings["micro"])
                row["micro_over_whole"] = row["micro_s"] / row["whole_s"]
                row["max_rel_diff"] = max(((a - b).abs() / b.abs()).max().item()
                                          for a, b in zip(scales["micro"].layers, scales["whole"].layers))
            rows.append(row)
            print_row(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

"""Weight memory and batch-1 decode speed of the INT8 / INT6 runtime against bfloat16, in one run.

One random Mamba1 model per shape (mamba_ssm's initialisation), saved once in bfloat16 and loaded three ways:
unquantised, `--quantize int8` and `--quantize int6` (linear layers and the embedding / tied LM head). For
each it reports the bytes the weights occupy (`runtime.quant.weight_bytes`, the tensors as stored) and the
device memory allocated after loading, then the mean time of a greedy decode step at batch 1 after a
64-token prefill (a decode step reads every weight once, so INT8 should not be slower than bfloat16); on
CUDA the step is replayed as a CUDA graph, as the server runs it, so that launches do not hide the weights.

    python -m bench.quant_decode --shapes 130m,1.4b --device cuda --json $OUT/quant.json
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any
from pathlib import Path

import torch

from runtime import load_model
from runtime.quant import QuantizedWeight, weight_bytes

from .decode_timing import decode_ms_per_token
from .random_model import SHAPES, save_random_model
from .report import print_row, print_table, save_json

SCHEMES = (None, "int8", "int6")


def _allocated(device: torch.device) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def bench_shape(name: str, device: torch.device, steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        save_random_model(name, Path(directory))
        for scheme in SCHEMES:
            loaded = load_model(directory, device=str(device), dtype="bfloat16", quantize=scheme,
                                quantize_embedding=scheme is not None)
            row: dict[str, Any] = {
                "shape": name, "weights": scheme or "bfloat16", "weight_gib": weight_bytes(loaded.model) / 2**30,
                "allocated_gib": _allocated(device),
                "decode_ms": decode_ms_per_token(loaded.model, 1, 64, steps, graphed=device.type == "cuda")}
            quantized = [m for m in loaded.model.modules() if isinstance(m, QuantizedWeight)]
            row["quantized_layers"] = len(quantized)
            rows.append(row)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = rows[0]
    for row in rows:
        row["weight_ratio"] = row["weight_gib"] / base["weight_gib"]
        row["decode_ratio"] = row["decode_ms"] / base["decode_ms"]
        print_row(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="130m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [row for name in args.shapes.split(",") for row in bench_shape(name, device, args.steps)]
    print()
    print_table(["shape", "weights", "weight GiB", "ratio", "decode ms/token", "ratio"],
                [[r["shape"], r["weights"], f"{r['weight_gib']:.3f}", f"{r['weight_ratio']:.3f}",
                  f"{r['decode_ms']:.2f}", f"{r['decode_ratio']:.3f}"] for r in rows])
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

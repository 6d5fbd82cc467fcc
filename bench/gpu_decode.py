"""GPU decode: this runtime's decode step (eager and as a CUDA graph) against raw `mamba_ssm`'s
`generate(cg=True)`, on the same random weights, in one run.

Peer: as `shared/device/reference_bench.py` measures it, batch 1, a 1,024-token prompt, 256 new tokens, the
prefill's time subtracted. Runtime: after the same prefill, the mean of 256 steps of
`DecodeGraphs.step` (greedy, the argmax on the GPU; the token never leaves the device), at batch 1 with
identity and with a per-channel (Mamba2: per-head) Δ scale set, the eager `MambaLM.step` at batch 1, and the
graph at batch 64 (tokens/s against batch 1's).

    python -m bench.gpu_decode --shapes 130m,1.4b --json $OUT/decode.json
    python -m bench.gpu_decode --shapes mamba2-780m,mamba2-2.7b --json $OUT/decode_mamba2.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any
from pathlib import Path

import torch

from .decode_timing import decode_ms_per_token
from .gpu_models import SHAPES, VOCAB, peer_and_runtime, random_delta_scales
from .report import print_row, print_table, save_json

PROMPT, NEW = 1024, 256


def peer_ms_per_token(peer) -> float:
    x = torch.randint(0, 50000, (1, PROMPT), device="cuda")
    with torch.no_grad():
        peer.generate(x, max_length=PROMPT + 16, cg=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        peer.generate(x, max_length=PROMPT + NEW + 1, cg=True)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        start = time.perf_counter()
        peer(x, num_last_tokens=1)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
    return (total - prefill) / NEW * 1e3


def bench_shape(name: str, big_batch: int) -> dict:
    peer, loaded = peer_and_runtime(name)
    model = loaded.model
    row: dict[str, Any] = {"shape": name, "mamba_ssm_cg_ms": peer_ms_per_token(peer)}
    del peer
    torch.cuda.empty_cache()
    row["eager_ms"] = decode_ms_per_token(model, 1, PROMPT, NEW, graphed=False)
    row["graph_ms"] = decode_ms_per_token(model, 1, PROMPT, NEW)
    row["graph_scaled_ms"] = decode_ms_per_token(model, 1, PROMPT, NEW, random_delta_scales(loaded))
    big = decode_ms_per_token(model, big_batch, PROMPT, NEW)
    narrow = decode_ms_per_token(model, 1, PROMPT, NEW, ssm_dtype=model.dtype)  # --mamba-ssm-cache-dtype auto
    big_narrow = decode_ms_per_token(model, big_batch, PROMPT, NEW, ssm_dtype=model.dtype)
    row.update({"batch": big_batch, f"graph_b{big_batch}_ms": big, "graph_model_dtype_states_ms": narrow,
                f"graph_b{big_batch}_model_dtype_states_ms": big_narrow,
                "batch_speedup_model_dtype_states": big_batch / big_narrow * narrow,
                "time_ratio_vs_peer": row["graph_ms"] / row["mamba_ssm_cg_ms"],
                "scale_overhead": row["graph_scaled_ms"] / row["graph_ms"] - 1,
                "batch_speedup": big_batch / big * row["graph_ms"]})  # tokens/s at big batch over batch 1's
    print_row(row)
    del model, loaded
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="130m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=64, help="the large decode batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = [bench_shape(name, args.batch) for name in args.shapes.split(",")]
    print(f"\n{torch.cuda.get_device_name()}, bf16, vocabulary {VOCAB}")
    print_table(["shape", "mamba_ssm cg ms/token", "runtime eager", "runtime graph", "ratio", "graph, Δ scales",
                 f"batch {args.batch} tokens/s ÷ batch 1", "graph, bf16 states", f"batch {args.batch} ms, bf16 states",
                 f"batch {args.batch} ÷ batch 1, bf16 states"],
                [[r["shape"], f"{r['mamba_ssm_cg_ms']:.3f}", f"{r['eager_ms']:.3f}", f"{r['graph_ms']:.3f}",
                  f"{r['time_ratio_vs_peer']:.3f}", f"{r['scale_overhead']:+.1%}", f"{r['batch_speedup']:.1f}",
                  f"{r['graph_model_dtype_states_ms']:.3f}", f"{r[f'graph_b{args.batch}_model_dtype_states_ms']:.3f}",
                  f"{r['batch_speedup_model_dtype_states']:.1f}"] for r in rows])
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

"""Where the GPU time goes: the kernels of one prefill (this runtime and raw `mamba_ssm`, same random weights)
and of one decode step (this runtime: batch 1 eager and replayed from its CUDA graph, and the graph at
`--batch`), counted and timed by the PyTorch profiler. What `bench.gpu_prefill` and `bench.gpu_decode` time
as a whole, broken down, so that the next optimisation aims at a measured cost.

    python -m bench.gpu_profile --shape 130m --tokens 8192 --json $OUT/profile.json
    python -m bench.gpu_profile --shape mamba2-780m --batch 64
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from runtime.decode_graph import DecodeGraphs

from .gpu_models import SHAPES, peer_and_runtime, random_delta_scales
from .report import print_table, save_json

TOP = 12  # kernels listed per profile


def kernel_table(fn, repeats: int) -> dict:
    """Per call of `fn` (after one unprofiled call): how many GPU kernels ran, their summed time (µs), and each
    kernel name's count and time, the costliest first."""
    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    by_name: defaultdict[str, list] = defaultdict(lambda: [0, 0.0])  # kernel -> [count, µs]
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            by_name[event.name][0] += 1
            by_name[event.name][1] += event.time_range.elapsed_us()
    kernels = sorted(([name, count / repeats, us / repeats] for name, (count, us) in by_name.items()),
                     key=lambda row: -row[2])
    return {"kernels_per_call": sum(row[1] for row in kernels), "kernel_us_per_call": sum(row[2] for row in kernels),
            "kernels": [{"name": name, "count": count, "us": round(us, 2)} for name, count, us in kernels]}


def report(title: str, table: dict) -> None:
    print(f"\n### {title}: {table['kernels_per_call']:.0f} kernels, "
          f"{table['kernel_us_per_call']:.0f} µs of kernels per call")
    print_table(["kernel", "per call", "µs per call"],
                [[row["name"][:90], f"{row['count']:.0f}", f"{row['us']:.1f}"] for row in table["kernels"][:TOP]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="130m", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="prefill length")
    parser.add_argument("--batch", type=int, default=64, help="the large decode batch profiled")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    peer, loaded = peer_and_runtime(args.shape)
    model = loaded.model
    scales = random_delta_scales(loaded)
    tables = {}
    with torch.no_grad():
        tokens = torch.randint(0, 50000, (1, args.tokens), device="cuda")
        tables["prefill mamba_ssm"] = kernel_table(lambda: peer(tokens, num_last_tokens=1), repeats=3)
        tables["prefill runtime"] = kernel_table(lambda: model.prefill(tokens), repeats=3)
        tables["prefill runtime, Δ scales"] = kernel_table(lambda: model.prefill(tokens, scales=scales), repeats=3)
        pool = model.new_state(2)  # row 0 the sequence's, row 1 the graphs' scratch row
        slots, token = torch.zeros(1, dtype=torch.long, device="cuda"), tokens[:, -1]
        tables["decode step, eager"] = kernel_table(lambda: model.step(token, pool, None, slots), repeats=20)
        graphs = DecodeGraphs(model, pool)
        tables["decode step, graph"] = kernel_table(lambda: graphs.step(token, slots, None), repeats=20)
        tables["decode step, graph, Δ scales"] = kernel_table(lambda: graphs.step(token, slots, scales), repeats=20)
        big_pool = model.new_state(args.batch + 1)  # + the scratch row
        big_slots = torch.arange(args.batch, device="cuda")  # (batch,)
        big_graphs, big_tokens = DecodeGraphs(model, big_pool), tokens[0, -args.batch:]  # (batch,)
        tables[f"decode step, graph, batch {args.batch}"] = kernel_table(
            lambda: big_graphs.step(big_tokens, big_slots, None), repeats=20)
    for title, table in tables.items():
        report(title, table)
    save_json({"shape": args.shape, "tokens": args.tokens, **tables}, args.json)


if __name__ == "__main__":
    main()

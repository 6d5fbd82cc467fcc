"""Where the GPU time goes: the kernels of one prefill (this runtime and raw `mamba_ssm`, same random weights)
and of one decode step (this runtime: batch 1 eager and replayed from its CUDA graph, and the graph at
`--batch`), counted and timed by the PyTorch profiler. What `bench.gpu_prefill` and `bench.gpu_decode` time
as a whole, broken down, so that the next optimisation aims at a measured cost.

And the engine's prefill step of short prompts (`--served-chunk` tokens, alone and `--batch` of them, as the
server runs a step: the model runner's prefill, the last position's logits, a greedy choice read back): its wall
time against its kernels' time, and the host operations by their own CPU time (where a short step's wall time
goes beyond its kernels).

    python -m bench.gpu_profile --shape 130m --tokens 8192 --json $OUT/profile.json
    python -m bench.gpu_profile --shape mamba2-780m --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from runtime import MambaLM
from runtime.decode_graph import DecodeGraphs
from scale_bank import NONE
from server.config import EngineConfig
from server.model_runner import ModelRunner
from server.sampling import greedy
from server.slots import sized, slot_bytes, ssm_state_dtype

from .gpu_models import SHAPES, peer_and_runtime, random_delta_scales
from .report import print_table, save_json
from .server_process import workload_prompt

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


def served_runner(model: MambaLM, slots: int, prefill_graphs: bool = True) -> ModelRunner:
    """A model runner of `slots` sequences, sized as the server sizes it on the model's device."""
    config = EngineConfig(max_batch_size=slots, prefill_graphs=prefill_graphs)
    return ModelRunner(model, sized(config, model.device, slot_bytes(model, ssm_state_dtype(model, None))))


def served_step(runner: ModelRunner, chunk: int, batch: int) -> Callable[[], list[int]]:
    """The engine's prefill step of `batch` prompts' first chunks of `chunk` tokens in `runner`'s first slots: the
    runner's prefill (replayed from a prefill graph where the runner has them), the last position's logits, a
    greedy choice read back."""
    prompts = [workload_prompt(chunk)] * batch

    def step() -> list[int]:
        last = runner.prefill(list(range(batch)), prompts, [True] * batch, [NONE] * batch, whole=False).last  # (b, D)
        chosen: list[int] = greedy(runner.model.logits(last)).tolist()
        return chosen

    return step


def median_ms(step: Callable[[], object], times: int = 15) -> float:
    """`step`'s median wall time (ms) over `times` calls, after two (compiles, captures)."""
    step()
    step()
    walls = []
    for _ in range(times):
        started = time.perf_counter()
        step()
        walls.append(time.perf_counter() - started)
    return statistics.median(walls) * 1e3


def served_prefill(model: MambaLM, chunk: int, batch: int) -> dict:
    """The engine's prefill step of `batch` prompts' first chunks of `chunk` tokens: its median wall time over 15
    steps (ms), its kernels (kernel_table), and the host operations by their own CPU time per step."""
    step = served_step(served_runner(model, batch), chunk, batch)
    wall_ms = median_ms(step)
    table = kernel_table(step, repeats=5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    host = sorted(prof.key_averages(), key=lambda event: -event.self_cpu_time_total)[:TOP]
    return {"wall_ms": round(wall_ms, 3), **table,
            "host": [{"name": e.key, "count": e.count / 5, "self_us": round(e.self_cpu_time_total / 5, 1)}
                     for e in host]}


def report(title: str, table: dict) -> None:
    print(f"\n### {title}: {table['kernels_per_call']:.0f} kernels, "
          f"{table['kernel_us_per_call']:.0f} µs of kernels per call")
    print_table(["kernel", "per call", "µs per call"],
                [[row["name"][:90], f"{row['count']:.0f}", f"{row['us']:.1f}"] for row in table["kernels"][:TOP]])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="130m", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="prefill length")
    parser.add_argument("--batch", type=int, default=64, help="the large decode (and served prefill) batch profiled")
    parser.add_argument("--served-chunk", type=int, default=64, help="prompt tokens of the served prefill step")
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
        served = {batch: served_prefill(model, args.served_chunk, batch) for batch in (1, args.batch)}
    for title, table in tables.items():
        report(title, table)
    for batch, step in served.items():
        report(f"served prefill step, {batch} × {args.served_chunk} tokens: wall {step['wall_ms']:.2f} ms, "
               f"{step['wall_ms'] * 1e3 / step['kernel_us_per_call']:.1f}× its kernels' time", step)
        print_table(["host operation", "per step", "own CPU µs per step"],
                    [[row["name"][:90], f"{row['count']:.0f}", f"{row['self_us']:.1f}"] for row in step["host"]])
    save_json({"shape": args.shape, "tokens": args.tokens, **tables,
               **{f"served prefill, batch {batch}": step for batch, step in served.items()}}, args.json)


if __name__ == "__main__":
    main()

"""A served prefill step of B prompts of `--tokens` tokens, replayed from its CUDA graph and launched one by one, for
each B of `--batches`, in one run: what a burst of short prompts costs a step as it grows, and where the captured
batch sizes (runtime.prefill_graph.prefill_graph_sizes) pad it.

Each way runs in a model runner of the server's sizing with `--batches`' largest batch of slots (the graphs captured
as the first step of each size asks, the eager way with `--eager-prefill`'s setting): the runner's prefill of the
prompts' first chunks, the last position's logits and a greedy choice read back, median wall time of 15 steps.

    python -m bench.prefill_steps --shape 1.4b --tokens 64 --json $OUT/prefill_steps.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .gpu_models import SHAPES, peer_and_runtime
from .gpu_profile import median_ms, served_runner, served_step
from .report import print_table, save_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=64, help="prompt tokens of each row")
    parser.add_argument("--batches", default="1,2,4,8,12,16,24,32,40,48,56,64")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    _, loaded = peer_and_runtime(args.shape)
    model = loaded.model
    rows = []
    with torch.no_grad():
        for graphs in (True, False):
            runner = served_runner(model, max(batches), prefill_graphs=graphs)
            for batch in batches:
                rows.append({"graphs": graphs, "batch": batch,
                             "step_ms": round(median_ms(served_step(runner, args.tokens, batch)), 3)})
            del runner
            torch.cuda.empty_cache()
    by = {(r["graphs"], r["batch"]): r["step_ms"] for r in rows}
    print(f"\n{torch.cuda.get_device_name()}, {args.shape}, bf16, prompts of {args.tokens} tokens")
    print_table(["prompts a step", "graph ms", "eager ms", "graph ÷ eager"],
                [[str(b), f"{by[True, b]:.2f}", f"{by[False, b]:.2f}", f"{by[True, b] / by[False, b]:.2f}"]
                 for b in batches])
    save_json({"shape": args.shape, "tokens": args.tokens, "steps": rows}, args.json)


if __name__ == "__main__":
    main()

"""CPU prefill: this runtime against transformers' `MambaForCausalLM` (`use_mambapy=True`) on the same weights.

One run measures both, side by side, and prints the ratio (issue: ≤ 1/3 of transformers' time at 64k).

    python -m bench.cpu_prefill --lengths 8192,32768 [--json out.json]

At long prompts transformers' mambapy scan needs much memory: it keeps every token's (d, n) state.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import MambaConfig, MambaForCausalLM

from runtime import load_model


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--d-state", type=int, default=48, help="48: the embedded model's state size")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.d_model, state_size=args.d_state,
                         num_hidden_layers=args.n_layer, use_mambapy=True)
    peer = MambaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        peer.save_pretrained(directory)
        ours = load_model(directory).model
    print(f"CPU prefill, Mamba1 d_model {args.d_model}, {args.n_layer} layers, d_state {args.d_state}, "
          f"vocab {args.vocab}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>8} {'runtime s':>10} {'transformers s':>15} {'ratio':>7}")
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        tokens = torch.randint(0, args.vocab, (1, length))
        ours_s = _timed(partial(ours.prefill, tokens))
        with torch.no_grad():
            peer_s = _timed(partial(peer, tokens, use_cache=False, logits_to_keep=1))
        results.append({"tokens": length, "runtime_s": round(ours_s, 3), "transformers_s": round(peer_s, 3),
                        "ratio": round(ours_s / peer_s, 3)})
        print(f"{length:>8} {ours_s:>10.2f} {peer_s:>15.2f} {ours_s / peer_s:>7.3f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB (both models)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

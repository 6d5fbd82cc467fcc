"""GPU prefill: this runtime against raw `mamba_ssm` (`MambaLMHeadModel`) on the same random weights.

Both are measured in one run, the way `shared/device/reference_bench.py` measures the peer (bf16, batch 1,
last-token logits, a warm-up call, then the mean of calls repeated for a while): time and peak memory, plus
this runtime with a per-channel (Mamba2: per-head) Δ scale set (the cost of scales against identity). The three
take turns, `--rounds` rounds (5) of at least 0.2 s each, and each reports its median round, so that the
machine's drift during the run does not land on one of them. With `--chunks`, the runtime's prefill of the same
prompt in chunks of those lengths (each continuing the last one's state, as the server runs a long prompt) takes
its turns too, against the prompt in one piece.

Both sides also run as a server runs them, writing the prompt's final state into a cache allocated beforehand
(so that decoding can go on from it): the peer into its inference cache (`allocate_inference_cache`, as its
`generate` prefills), this runtime into a row of a state pool (`prefill_rows`, as the engine prefills). The
plain forward keeps no state on either side (the runtime's `hidden_states_only`, as scoring runs it); the
chunked variants are `prefill`'s, which returns the state.

    python -m bench.gpu_prefill --shapes 130m --lengths 2048,8192,32768,65536 --json $OUT/prefill.json
    python -m bench.gpu_prefill --shapes mamba2-780m,mamba2-2.7b --json $OUT/prefill_mamba2.json
    python -m bench.gpu_prefill --shapes 130m,1.4b --lengths 61440 --chunks 2048,8192,16384
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from runtime import BatchScales, MambaLM, PoolRows

from .gpu_models import SHAPES, peer_and_runtime, random_delta_scales
from .report import print_row, save_json
from .timing import measure_in_turns


def bench_shape(name: str, lengths: list[int], rounds: int, chunks: list[int]) -> list[dict]:
    from mamba_ssm.utils.generation import InferenceParams

    peer, loaded = peer_and_runtime(name)
    ours = loaded.model
    scales = random_delta_scales(loaded)
    pool_row = PoolRows(ours.new_state(1), torch.zeros(1, dtype=torch.long, device="cuda"), fresh=None)
    rows = []
    with torch.no_grad():
        for length in lengths:
            tokens = torch.randint(0, 50000, (1, length), device="cuda")
            chunked = {f"chunks of {c}": partial(ours.prefill, tokens, chunk_len=c) for c in chunks if c < length}
            cache = InferenceParams(max_seqlen=length, max_batch_size=1)
            cache.key_value_memory_dict = peer.allocate_inference_cache(1, length)
            timed = measure_in_turns({"peer": partial(peer, tokens, num_last_tokens=1),
                                      "ours": partial(_forward, ours, tokens),
                                      "scaled": partial(_forward, ours, tokens, scales),
                                      "peer cached": partial(peer, tokens, inference_params=cache, num_last_tokens=1),
                                      "ours pooled": partial(_prefill_into_pool, ours, tokens, pool_row),
                                      **chunked}, rounds)
            (peer_s, peer_gib), (ours_s, ours_gib) = timed["peer"], timed["ours"]
            scaled_s, scaled_gib = timed["scaled"]
            (cached_s, cached_gib), (pooled_s, pooled_gib) = timed["peer cached"], timed["ours pooled"]
            row = {"shape": name, "tokens": length, "mamba_ssm_ms": round(peer_s * 1e3, 2),
                   "runtime_ms": round(ours_s * 1e3, 2), "runtime_scaled_ms": round(scaled_s * 1e3, 2),
                   "time_ratio": round(ours_s / peer_s, 3), "scale_overhead": round(scaled_s / ours_s - 1, 4),
                   "mamba_ssm_peak_gib": round(peer_gib, 3), "runtime_peak_gib": round(ours_gib, 3),
                   "runtime_scaled_peak_gib": round(scaled_gib, 3), "memory_ratio": round(ours_gib / peer_gib, 3),
                   "mamba_ssm_cached_ms": round(cached_s * 1e3, 2), "runtime_pooled_ms": round(pooled_s * 1e3, 2),
                   "pooled_time_ratio": round(pooled_s / cached_s, 3),
                   "mamba_ssm_cached_peak_gib": round(cached_gib, 3), "runtime_pooled_peak_gib": round(pooled_gib, 3),
                   "pooled_memory_ratio": round(pooled_gib / cached_gib, 3),
                   **{f"{variant} ÷ whole": round(timed[variant][0] / ours_s, 3) for variant in chunked}}
            rows.append(row)
            print_row(row)
    del peer, ours
    torch.cuda.empty_cache()
    return rows


def _forward(model: MambaLM, tokens: torch.Tensor, scales: BatchScales | None = None) -> torch.Tensor:
    """The plain forward, as the peer's: the last position's logits (1, V), no state kept."""
    return model.logits(model.hidden_states_only(tokens, scales)[:, -1])


def _prefill_into_pool(model: MambaLM, tokens: torch.Tensor, rows: PoolRows) -> torch.Tensor:
    """The engine's prefill of one prompt: its state into the pool's row, the last position's logits (1, V)."""
    return model.logits(model.prefill_rows(tokens, rows)[:, -1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="130m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--lengths", default="2048,8192,32768,65536")
    parser.add_argument("--rounds", type=int, default=5,
                        help="turns each variant takes (more steady the launch-bound short prompts' ratios)")
    parser.add_argument("--chunks", default="", help="comma-separated chunk lengths to time the prompt in too")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    chunks = [int(x) for x in args.chunks.split(",") if x]
    torch.backends.cuda.matmul.allow_tf32 = True
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = [row for shape in args.shapes.split(",") for row in bench_shape(shape, lengths, args.rounds, chunks)]
    print(f"\n{torch.cuda.get_device_name()}, bf16, batch 1")
    print(f"{'shape':>11} {'tokens':>7} {'mamba_ssm ms':>13} {'runtime ms':>11} {'ratio':>6} {'scaled':>7} "
          f"{'peak GiB peer':>14} {'ours':>6} {'ratio':>6} {'pooled: time ratio':>19} {'peak GiB peer':>14} "
          f"{'ours':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['shape']:>11} {r['tokens']:>7} {r['mamba_ssm_ms']:>13.2f} {r['runtime_ms']:>11.2f} "
              f"{r['time_ratio']:>6.3f} {r['scale_overhead']:>+7.1%} {r['mamba_ssm_peak_gib']:>14.2f} "
              f"{r['runtime_peak_gib']:>6.2f} {r['memory_ratio']:>6.3f} {r['pooled_time_ratio']:>19.3f} "
              f"{r['mamba_ssm_cached_peak_gib']:>14.2f} {r['runtime_pooled_peak_gib']:>6.2f} "
              f"{r['pooled_memory_ratio']:>6.3f}")
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

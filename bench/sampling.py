"""Choosing the next token: the server's sampling (server.sampling.choose) against transformers' sampling on the
same logits, and against greedy, in one run.

The logits are the model's own at the positions of a text (`--text`, default docs/ARCHITECTURE.md), `--batch`
rows of them, every row with the same sampling fields. The peer is what `generate(do_sample=True)` does with
the same fields: transformers' temperature, top-k, top-p and min-p warpers, a softmax and `torch.multinomial`.
The server's step also gives every row its own generator (a seed gives the same text whatever else is
batched), which the peer's one draw for the batch does not. The three are timed in turns within each round, the
rounds repeated, the medians printed with the ratios.

    python -m bench.sampling [--model models/mamba-extend-default] [--batch 1,16,64] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from runtime import load_model
from runtime.tokenizer import Tokenizer
from server.config import DEFAULT_MODEL_DIR
from server.request import SamplingParams
from server.sampling import choose, greedy

from .report import print_row, print_table, save_json
from .timing import measure_in_turns

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: the request's sampling fields
    "temperature 1": {"temperature": 1.0},
    "temperature 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "temperature 1, top_p 0.95": {"temperature": 1.0, "top_p": 0.95},
    "temperature 0.8, top_k 40": {"temperature": 0.8, "top_k": 40},
    "temperature 1, min_p 0.05": {"temperature": 1.0, "min_p": 0.05},
}
MIN_SECONDS = 0.1  # of calls of each side in a round


def model_logits(model_dir: Path, text: Path, rows: int, device: str) -> torch.Tensor:
    """The model's logits (rows, V) at the first `rows` positions past the 100th of `text`, cut to the tokenizer's
    vocabulary."""
    loaded = load_model(model_dir, device=device)
    tokenizer = Tokenizer(model_dir / "tokenizer.json")
    ids = tokenizer.encode(text.read_text())[:100 + rows]
    if len(ids) < 100 + rows:
        raise SystemExit(f"{text}: {len(ids)} tokens, {100 + rows} needed")
    with torch.no_grad():
        hidden = loaded.model.hidden_states_only(torch.tensor([ids], device=loaded.model.device))  # (1, l, D)
        return loaded.model.logits(hidden[0, 100:])[:, :tokenizer.vocab_size].contiguous()  # (rows, V)


def peer(fields: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' sampling with `fields`, as generate(do_sample=True) applies them: (b, V) -> (b,)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(fields["temperature"])])
    if "top_k" in fields:
        warpers.append(TopKLogitsWarper(fields["top_k"]))
    if "top_p" in fields:
        warpers.append(TopPLogitsWarper(fields["top_p"]))
    if "min_p" in fields:
        warpers.append(MinPLogitsWarper(fields["min_p"]))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits)  # type: ignore[arg-type]  # (the warpers read no input ids)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--text", type=Path, default=REPO / "docs" / "ARCHITECTURE.md")
    parser.add_argument("--batch", default="1,16,64", help="rows sampled together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the engine thread's default: 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    all_logits = model_logits(args.model, args.text, max(batches), args.device)
    rows, lines = [], []
    for batch in batches:
        logits = all_logits[:batch]
        for name, fields in SETTINGS.items():
            params = [SamplingParams(1, **fields) for _ in range(batch)]  # type: ignore[arg-type]
            generators = [random.Random(i) for i in range(batch)]
            sides: dict[str, Callable[[], object]] = {
                "server": partial(choose, logits, params, generators), "transformers": partial(peer(fields), logits),
                "greedy": partial(greedy, logits)}
            ms = {side: seconds * 1e3 for side, (seconds, _) in
                  measure_in_turns(sides, args.rounds, MIN_SECONDS).items()}
            row = {"batch": batch, "setting": name, **{f"{side}_ms": value for side, value in ms.items()},
                   "server_over_transformers": ms["server"] / ms["transformers"],
                   "server_over_greedy": ms["server"] / ms["greedy"]}
            print_row(row)
            rows.append(row)
            lines.append([str(batch), name, f"{ms['server']:.3f}", f"{ms['transformers']:.3f}",
                          f"{ms['greedy']:.3f}", f"{row['server_over_transformers']:.2f}",
                          f"{row['server_over_greedy']:.1f}"])
    print_table(["batch", "sampling fields", "server ms", "transformers ms", "greedy ms", "server ÷ transformers",
                 "server ÷ greedy"], lines)
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

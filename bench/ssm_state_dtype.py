"""What storing SSM states narrower costs: held-out text decoded one token at a time through a state pool,
float32 states against narrower ones, in one run.

Each step is fed the text's next token (teacher forcing) through `MambaLM.step` on pool rows, as the server
decodes; reported per text: the perplexity of its next tokens with each state dtype, their ratio, how often the
most likely next token is the same, and the seconds each took.

    python -m bench.ssm_state_dtype --data books=../shared/data/gutenberg/eval.jsonl.xz --tokens 4096
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from extend.data import read_documents
from runtime import MambaLM, load_model
from runtime.tokenizer import find_tokenizer
from server.config import DEFAULT_MODEL_DIR

from .report import print_table, save_json


def decode_text(model: MambaLM, ids: torch.Tensor, vocab: int, ssm_dtype: torch.dtype) -> tuple[float, list[int]]:
    """ids (n + 1,): the perplexity of ids[1:] decoded step by step from a pool row of `ssm_dtype` states, and
    the most likely token at each step."""
    pool, slots = model.new_state(2, ssm_dtype), torch.tensor([1], device=model.device)
    nll, best = 0.0, []
    with torch.no_grad():
        for i in range(len(ids) - 1):
            logits = model.step(ids[i:i + 1], pool, slots=slots)[0, :vocab].float()  # (V,)
            nll -= torch.log_softmax(logits, -1)[ids[i + 1]].item()
            best.append(int(logits.argmax()))
    return math.exp(nll / (len(ids) - 1)), best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data", required=True, help="name=PATH,... of held-out texts (extend.data's files)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="the narrower state")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model = load_model(args.model, device=args.device).model
    tokenizer = find_tokenizer(args.model)
    narrow = getattr(torch, args.dtype)
    rows = []
    for spec in args.data.split(","):
        name, path = spec.split("=", 1)
        ids: list[int] = []
        for document in read_documents([path]):
            ids += tokenizer.encode(document.text)
            if len(ids) > args.tokens:
                break
        text = torch.tensor(ids[:args.tokens + 1], device=model.device)
        row: dict = {"text": name, "tokens": len(text) - 1}
        results = {}
        for dtype in (torch.float32, narrow):
            start = time.perf_counter()
            results[dtype] = decode_text(model, text, tokenizer.vocab_size, dtype)
            row[f"{dtype}_s".removeprefix("torch.")] = time.perf_counter() - start
        (wide_ppl, wide_best), (narrow_ppl, narrow_best) = results[torch.float32], results[narrow]
        row.update(float32_ppl=wide_ppl, narrow_ppl=narrow_ppl, ratio=narrow_ppl / wide_ppl,
                   same_argmax=sum(a == b for a, b in zip(wide_best, narrow_best)) / len(wide_best))
        rows.append(row)
    print_table(["text", "tokens", "perplexity, float32 states", f"{args.dtype} states", "ratio",
                 "same most likely token", "seconds"],
                [[r["text"], str(r["tokens"]), f"{r['float32_ppl']:.3f}", f"{r['narrow_ppl']:.3f}", f"{r['ratio']:.4f}",
                  f"{r['same_argmax']:.1%}", f"{r['float32_s']:.1f} / {r[f'{args.dtype}_s']:.1f}"] for r in rows])
    save_json(rows, args.json)


if __name__ == "__main__":
    main()

"""Save a checkpoint's weights quantised: `python -m runtime.quantize --model DIR --scheme int8 --out OUT`.

OUT holds config.json (with a "quantization" record), model.safetensors (int8 or packed int6 values and
float32 row scales, the rest as stored) and the tokenizer.json if DIR has one; it loads as it was saved,
smaller on disk and faster to load than quantising at every start. Its fingerprint is the same as
`--quantize` on DIR gives, so a bank built either way serves both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CheckpointError
from .loader import load_model, save_quantized
from .quant import SCHEMES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (either layout)")
    p.add_argument("--scheme", required=True, choices=tuple(SCHEMES))
    p.add_argument("--embedding", action="store_true", help="quantise the embedding (and the LM head) too")
    p.add_argument("--out", required=True, type=Path, help="directory to write (must not hold a checkpoint)")
    args = p.parse_args(argv)
    if (args.out / "config.json").exists():
        print(f"error: {args.out}: already holds a checkpoint; choose another --out", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model, quantize=args.scheme, quantize_embedding=args.embedding)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_quantized(loaded, args.out)
    print(f"{args.out}: {loaded.quantization} weights, fingerprint {loaded.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

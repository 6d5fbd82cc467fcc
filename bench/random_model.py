"""A random Mamba1 checkpoint of a published shape, for benchmarks that need a model directory.

    python -m bench.random_model --shape tiny --out TINY      # with the embedded model's tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from runtime import MAMBA1, MambaLM, ModelConfig
from runtime.backend import select_backend
from runtime.checkpoint_writer import save_hf
from runtime.init_weights import init_weights
from server.config import DEFAULT_MODEL_DIR

SHAPES = {"130m": (768, 24), "1.4b": (2048, 48)}  # d_model, n_layer of state-spaces/mamba-130m, mamba-1.4b
VOCAB = 50288  # GPT-NeoX-20B's 50,280 padded to a multiple of 16
# A model whose CPU decode step takes a fraction of a millisecond, as a larger model's does on a GPU: served, it
# leaves the server's host side (HTTP, streaming, bookkeeping) as the limit, the regime of a GPU server on a CPU.
# Its vocabulary is the embedded model's tokenizer's.
HOST_BOUND_SHAPES = {"tiny": (64, 2, 8192)}  # d_model, n_layer, vocab_size
SHAPE_NAMES = [*SHAPES, *HOST_BOUND_SHAPES]  # every shape save_random_model makes


def save_random_model(shape: str, directory: Path, tokenizer: Path | None = None) -> Path:
    """mamba_ssm's initialisation, seed 0, saved in bfloat16 (Hugging Face layout) with `tokenizer` if given."""
    d_model, n_layer, vocab = HOST_BOUND_SHAPES[shape] if shape in HOST_BOUND_SHAPES else (*SHAPES[shape], VOCAB)
    model = MambaLM(ModelConfig(arch=MAMBA1, d_model=d_model, n_layer=n_layer, vocab_size=vocab),
                    select_backend("torch", torch.device("cpu")))
    init_weights(model, seed=0)
    save_hf(model.to(torch.bfloat16), tokenizer, None, directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True, choices=SHAPE_NAMES)
    parser.add_argument("--out", required=True, type=Path, help="the checkpoint directory to write")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_MODEL_DIR / "tokenizer.json",
                        help="tokenizer.json copied beside it (default: the embedded model's)")
    args = parser.parse_args(argv)
    print(save_random_model(args.shape, args.out, args.tokenizer))


if __name__ == "__main__":
    main()

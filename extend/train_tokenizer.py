"""Train the embedded model's tokenizer: byte-level BPE on the training books.

    python -m extend.train_tokenizer --data ../shared/data/gutenberg/train-00.jsonl.xz ... --vocab 8192 \
        --out tokenizer.json

Digits are split one per token, so a 5-digit pass key is always 5 tokens: copying it is one skill, not
one per digit group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .data import read_documents

EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m extend.train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    docs = read_documents(args.data)
    tokenizer = train_tokenizer((doc.text for doc in docs), args.vocab)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out))
    print(f"{args.out}: vocabulary {tokenizer.get_vocab_size()} from {len(docs)} documents")


if __name__ == "__main__":
    main()

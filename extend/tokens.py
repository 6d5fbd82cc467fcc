"""Token windows cut from documents: what language-model losses and passkey haystacks are made of."""

from __future__ import annotations

import random

import torch

from runtime.tokenizer import Tokenizer

from .data import Document


class TokenSource:
    """Documents encoded on first use (books are long; most calibrations touch few of them)."""

    def __init__(self, docs: list[Document], tokenizer: Tokenizer):
        self.docs = docs
        self.tokenizer = tokenizer
        self._ids: dict[int, list[int]] = {}

    def ids(self, index: int) -> list[int]:
        if index not in self._ids:
            self._ids[index] = self.tokenizer.encode(self.docs[index].text)
        return self._ids[index]

    def window(self, length: int, rng: random.Random) -> list[int]:
        """`length` consecutive tokens from a random document, continuing into further random documents
        (separated by end-of-text when the tokenizer has one) when the first is too short."""
        separator = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        first = rng.randrange(len(self.docs))
        ids = list(self.ids(first))
        start = rng.randrange(max(1, len(ids) - length + 1))
        ids = ids[start:]
        while len(ids) < length:
            ids += separator + self.ids(rng.randrange(len(self.docs)))
        return ids[:length]

    def batch(self, length: int, count: int, rng: random.Random) -> torch.Tensor:
        """(count, length) int64 windows."""
        return torch.tensor([self.window(length, rng) for _ in range(count)], dtype=torch.long)

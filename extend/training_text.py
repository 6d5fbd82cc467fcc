"""The training recipe's text: one token stream per named source, drawn from with mixture weights."""

from __future__ import annotations

import random

import torch

from runtime.tokenizer import Tokenizer

from .passkey import filler_haystack
from .sources import FILLER, SourceSpec, read_source

REPEATED_SPAN = (12, 96)  # tokens of text a repeated haystack cycles: a short sentence to a few


def token_stream(texts: list[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All texts encoded and joined by end-of-text: one (N,) int64 tensor."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = [token for doc in tokenizer.encode_batch(texts) for token in separator + doc]
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length, (count,), generator=generator)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])  # (count, length)


class TrainingText:
    """Language-model windows come from the text sources, passkey haystacks from any source (the filler too),
    each draw from a source chosen by its weight; with one source, the draws are those of a single stream.
    A `repeated` fraction of the text haystacks is a short span of the source cycled to the length: logs, tables
    and boilerplate repeat themselves, and a key must outlast repetition as it outlasts prose."""

    def __init__(self, streams: dict[str, torch.Tensor], weights: dict[str, float], tokenizer: Tokenizer,
                 generator: torch.Generator, repeated: float = 0.0):
        self.streams, self.weights, self.tokenizer, self.generator = streams, weights, tokenizer, generator
        self.repeated = repeated
        self.text_sources = [name for name in streams if weights[name] > 0]
        self.haystack_sources = [name for name in weights if weights[name] > 0]
        if not self.text_sources:
            raise ValueError("training needs text: give at least one source other than the filler a weight")
        self._filler = filler_haystack(tokenizer)

    @classmethod
    def read(cls, specs: list[SourceSpec], weights: dict[str, float], tokenizer: Tokenizer,
             generator: torch.Generator, repeated: float = 0.0) -> TrainingText:
        streams = {s.name: token_stream([d.text for d in read_source(s)], tokenizer) for s in specs if not s.is_filler}
        return cls(streams, weights, tokenizer, generator, repeated)

    @property
    def tokens(self) -> int:
        return sum(len(stream) for stream in self.streams.values())

    def split(self, fraction: float, generator: torch.Generator) -> tuple[TrainingText, TrainingText]:
        """(the first 1 - fraction of every stream, the rest drawn with `generator`): text never trained on."""
        cuts = {name: int(len(s) * (1 - fraction)) for name, s in self.streams.items()}
        return (TrainingText({n: s[:cuts[n]] for n, s in self.streams.items()}, self.weights, self.tokenizer,
                             self.generator, self.repeated),
                TrainingText({n: s[cuts[n]:] for n, s in self.streams.items()}, self.weights, self.tokenizer,
                             generator, self.repeated))

    def _choose(self, names: list[str], count: int) -> list[str]:
        if len(names) == 1:
            return names * count
        weights = torch.tensor([self.weights[n] for n in names], dtype=torch.float)
        return [names[i] for i in torch.multinomial(weights, count, replacement=True, generator=self.generator)]

    def windows(self, length: int, count: int) -> torch.Tensor:
        """(count, length) int64 language-model windows."""
        if len(self.text_sources) == 1:
            return _windows(self.streams[self.text_sources[0]], length, count, self.generator)
        return torch.cat([_windows(self.streams[name], length, 1, self.generator)
                          for name in self._choose(self.text_sources, count)])

    def haystack(self, length: int, rng: random.Random) -> list[int]:
        """A passkey haystack of `length` tokens (extend.passkey's haystack callable)."""
        [name] = self._choose(self.haystack_sources, 1)
        if name == FILLER:
            return self._filler(length, rng)
        if self.repeated and rng.random() < self.repeated:  # (no draw without it: the recipe's stream stays)
            span = _windows(self.streams[name], min(length, rng.randint(*REPEATED_SPAN)), 1, self.generator)[0]
            return (span.tolist() * (length // len(span) + 1))[:length]
        return _windows(self.streams[name], length, 1, self.generator)[0].tolist()

"""The synthetic passkey retrieval task (template of shared/FINDINGS.md).

A 5-digit key is hidden at a chosen depth of a haystack of text; the question at the end asks for it:

    <haystack ...> The pass key is 12345. Remember it. 12345 is the pass key. <... haystack>
    What is the pass key? The pass key is| 12345

A sample is `length` tokens in all (prompt + answer). It is retrieved when every answer token is the
model's greedy choice: with teacher forcing, the argmax at each answer position equals the answer token,
which is exactly greedy generation reproducing the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from runtime.tokenizer import Tokenizer

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class PasskeySample:
    tokens: list[int]  # prompt then answer: `length` tokens in all
    answer_start: int  # index in `tokens` of the first answer token
    key: str
    depth: float  # where the needle sits in the haystack, 0 = start, 1 = end


def filler_haystack(tokenizer: Tokenizer) -> Callable[[int, random.Random], list[int]]:
    """The built-in haystack: one repeated paragraph, as in the passkey papers."""
    unit = tokenizer.encode(FILLER)

    def haystack(length: int, rng: random.Random) -> list[int]:
        return (unit * (length // len(unit) + 1))[:length]

    return haystack


def minimum_length(tokenizer: Tokenizer) -> int:
    """Tokens a sample needs besides its haystack (needle, question and a 5-digit answer)."""
    return len(tokenizer.encode("\n" + NEEDLE.format(key="00000") + "\n")) + len(
        tokenizer.encode("\n" + QUESTION)) + len(tokenizer.encode(" 00000"))


def make_sample(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random,
                haystack: Callable[[int, random.Random], list[int]]) -> PasskeySample:
    """A sample of exactly `length` tokens with a random key at `depth` of the haystack."""
    key = str(rng.randrange(10000, 100000))
    needle = tokenizer.encode("\n" + NEEDLE.format(key=key) + "\n")
    question = tokenizer.encode("\n" + QUESTION)
    answer = tokenizer.encode(" " + key)
    room = length - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"a passkey sample needs at least {length - room} tokens, not {length}")
    hay = haystack(room, rng)
    at = round(depth * room)
    tokens = hay[:at] + needle + hay[at:] + question + answer
    return PasskeySample(tokens, len(tokens) - len(answer), key, depth)


@dataclass
class PasskeyBatch:
    tokens: torch.Tensor  # (b, L) int64, the whole samples
    answer_mask: torch.Tensor  # (b, L) bool: True where the token is part of the answer
    depths: list[float]

    @classmethod
    def of(cls, samples: list[PasskeySample]) -> "PasskeyBatch":
        tokens = torch.tensor([s.tokens for s in samples], dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for row, s in enumerate(samples):
            mask[row, s.answer_start:] = True
        return cls(tokens, mask, [s.depth for s in samples])

    def to(self, device) -> "PasskeyBatch":
        return PasskeyBatch(self.tokens.to(device), self.answer_mask.to(device), self.depths)


def make_batch(tokenizer: Tokenizer, length: int, count: int, rng: random.Random,
               haystack: Callable[[int, random.Random], list[int]], depths: list[float] | None = None) -> PasskeyBatch:
    """`count` samples at `depths` (default: evenly spread over 0-100%, or random when count is 1)."""
    if depths is None:
        depths = [i / (count - 1) for i in range(count)] if count > 1 else [rng.random()]
    return PasskeyBatch.of([make_sample(tokenizer, length, d, rng, haystack) for d in depths])

"""Named sources of text: the domains a bank is calibrated on and evaluated on.

A source is written `NAME=PATH[+PATH...][@PART]`, or `filler` for the passkey papers' built-in repeated
paragraph (a haystack only: it has no text to score perplexity on). Several are given comma- or space-separated:

    books=gutenberg/train-01.jsonl.xz,docs=domains/python-docs.jsonl.xz@train,filler

A bare `PATH` (no name) belongs to the source named `text`, so `--data a.jsonl b.jsonl` is one source.

`@train` and `@eval` take a fixed part of a file's documents, chosen by a hash of each document's text
(EVAL_FRACTION of them are `eval`): calibrate on `@train` and evaluate on `@eval`, and the evaluation never
reads a document that calibration did, whatever the seed. Without a part, every document is read.

For calibration, each source gets a weight (`--mixture books=2,docs=1`; 1 by default): a batch draws each of its
samples from a source chosen with those weights.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.tokenizer import Tokenizer

from .data import DataError, Document, read_documents
from .passkey import filler_haystack
from .tokens import TokenSource

FILLER = "filler"
UNNAMED = "text"
PARTS = ("train", "eval")
EVAL_FRACTION = 0.3  # of a file's documents in its `@eval` part
_NAME = re.compile(r"[A-Za-z0-9_-]+")

Haystack = Callable[[int, random.Random], list[int]]  # (length, rng) -> token ids


@dataclass(frozen=True)
class SourceSpec:
    name: str
    paths: tuple[str, ...]  # empty for the filler
    part: str | None = None  # "train", "eval", or None for every document

    @property
    def is_filler(self) -> bool:
        return not self.paths

    def describe(self) -> str:
        return FILLER if self.is_filler else "+".join(self.paths) + (f"@{self.part}" if self.part else "")


def parse_sources(items: list[str]) -> list[SourceSpec]:
    """Source specs from command-line items (each may hold several, comma-separated), in order; bare paths
    join one source named `text`."""
    named: dict[str, SourceSpec] = {}
    bare: list[str] = []
    bare_part: set[str | None] = set()
    for item in (part.strip() for text in items for part in text.split(",")):
        if not item:
            continue
        if item == FILLER:
            spec = SourceSpec(FILLER, ())
        elif "=" in item:
            name, _, rest = item.partition("=")
            if not _NAME.fullmatch(name) or name in (FILLER, UNNAMED):
                raise DataError(f"{item}: a source name is letters, digits, '_' or '-', and not {FILLER!r} or "
                                f"{UNNAMED!r}")
            paths, part = _paths_and_part(rest, item)
            spec = SourceSpec(name, paths, part)
        else:
            paths, part = _paths_and_part(item, item)
            bare += paths
            bare_part.add(part)
            continue
        if spec.name in named:
            raise DataError(f"{item}: source {spec.name!r} is given twice")
        named[spec.name] = spec
    if bare:
        if len(bare_part) > 1:
            raise DataError(f"{', '.join(bare)}: unnamed paths must share one part (or name them: NAME=PATH@PART)")
        named = {UNNAMED: SourceSpec(UNNAMED, tuple(bare), bare_part.pop())} | named
    if not named:
        raise DataError("no data sources given")
    return list(named.values())


def _paths_and_part(text: str, item: str) -> tuple[tuple[str, ...], str | None]:
    joined, at, part = text.rpartition("@") if "@" in text else (text, "", "")
    if at and part not in PARTS:
        raise DataError(f"{item}: unknown part {part!r} (known: {', '.join(PARTS)})")
    paths = tuple(p for p in joined.split("+") if p)
    if not paths:
        raise DataError(f"{item}: no path")
    return paths, part or None


def parse_mixture(text: str | None, sources: list[SourceSpec]) -> dict[str, float]:
    """{"books": 2, ...} from "books=2,docs=1"; sources not named weigh 1."""
    weights = {spec.name: 1.0 for spec in sources}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, value = item.partition("=")
        if name not in weights:
            raise DataError(f"--mixture {item}: no source named {name!r} (sources: {', '.join(weights)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise DataError(f"--mixture {item}: weight {value!r} is not a number") from None
        if not weights[name] >= 0:
            raise DataError(f"--mixture {item}: a weight is at least 0")
    if not any(weights.values()):
        raise DataError("--mixture: every weight is 0")
    return weights


def document_part(doc: Document) -> str:
    """"eval" for EVAL_FRACTION of documents, "train" for the rest, by a hash of the text (seed-free)."""
    digest = int.from_bytes(hashlib.sha256(doc.text.encode("utf-8")).digest()[:8], "big")
    return "eval" if digest < EVAL_FRACTION * 2**64 else "train"


def read_source(spec: SourceSpec) -> list[Document]:
    """The documents of `spec` (of its part); none for the filler."""
    if spec.is_filler:
        return []
    docs = read_documents(list(spec.paths))
    if spec.part is not None:
        docs = [doc for doc in docs if document_part(doc) == spec.part]
        if not docs:
            raise DataError(f"{spec.describe()}: no documents in part {spec.part!r}")
    return docs


@dataclass
class Domain:
    """One source made ready: its text (None for the filler) and the passkey haystack cut from it."""

    name: str
    text: TokenSource | None
    haystack: Haystack

    @classmethod
    def of(cls, name: str, docs: list[Document], tokenizer: Tokenizer) -> Domain:
        if not docs:
            return cls(name, None, filler_haystack(tokenizer))
        text = TokenSource(docs, tokenizer)
        return cls(name, text, text.window)


class Mixture:
    """Draws from several domains with weights: a haystack callable, and text windows from the domains
    that have text (TokenSource's `window` and `batch`)."""

    def __init__(self, domains: list[Domain], weights: dict[str, float]):
        self.weights = weights  # by domain name
        drawn = [d for d in domains if weights[d.name] > 0]
        self.haystacks = {d.name: d.haystack for d in drawn}
        self.texts = {d.name: d.text for d in drawn if d.text is not None}  # the domains that have text

    def _draw(self, names: list[str], rng: random.Random) -> str:
        """One of `names` by weight (no draw, and so no use of `rng`, when there is one)."""
        return names[0] if len(names) == 1 else rng.choices(names, [self.weights[name] for name in names])[0]

    def _texts(self) -> dict[str, TokenSource]:
        if not self.texts:
            raise DataError("language modelling needs text: every calibration source is the filler")
        return self.texts

    def haystack(self, length: int, rng: random.Random) -> list[int]:
        return self.haystacks[self._draw(list(self.haystacks), rng)](length, rng)

    def window(self, length: int, rng: random.Random) -> list[int]:
        texts = self._texts()
        return texts[self._draw(list(texts), rng)].window(length, rng)

    def batch(self, length: int, count: int, rng: random.Random) -> torch.Tensor:
        """(count, length) int64 windows."""
        return torch.tensor([self.window(length, rng) for _ in range(count)], dtype=torch.long)

    def batches(self, length: int, count: int, rng: random.Random) -> dict[str, torch.Tensor]:
        """(count, length) int64 windows of each domain that has text: what a per-domain hinge compares."""
        return {name: text.batch(length, count, rng) for name, text in self._texts().items()}

"""Prefix caching (vLLM's --enable-prefix-caching) for a recurrent model: which stored state a prompt continues from.

A Mamba sequence's whole context is one fixed-size state, which depends on the tokens before it and on the scales
they ran with (the request's scale bucket) only. So the state after a prompt's first n tokens, kept in a row of
the model runner's prefix pool, lets a later prompt that starts with the same n tokens under the same bucket skip
them exactly, whatever n is: a second question about the same 60k-token document prefills only the question.
An entry costs one slot's bytes.

What is stored (by the engine, after each prefill chunk): for each prompt, the state at its newest chunk boundary
before its end, in one row it overwrites as its prefill advances (the document, for a prompt of document and
question), and the state after the whole prompt, in a row of its own (the start of a longer prompt that repeats
it: a chat's next turn). Rows are reused least recently used first. Pure bookkeeping: the engine copies the rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Entry:
    bucket: str  # the scale bucket the tokens ran with
    tokens: list[int]  # the prefix whose state the row holds
    row: int  # of the prefix pool
    owner: str | None = None  # the request whose running entry this is (it moves the entry as it prefills)


class PrefixCache:
    def __init__(self, rows: int):
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # by row, least recently used first
        self._free = list(range(rows - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, bucket: str, prompt: Sequence[int]) -> Entry | None:
        """The entry of the longest prefix of `prompt` stored under `bucket`, shorter than the prompt (its last
        token must run, for the first token's logits); it becomes the most recently used."""
        best: Entry | None = None
        for entry in self._entries.values():
            n = len(entry.tokens)
            if (entry.bucket == bucket and n < len(prompt) and (best is None or n > len(best.tokens))
                    and prompt[n - 1] == entry.tokens[-1] and list(prompt[:n]) == entry.tokens):
                best = entry
        if best is not None:
            self._entries.move_to_end(best.row)
        return best

    def place(self, bucket: str, tokens: Sequence[int], owner: str | None = None) -> int | None:
        """The row to store the state after `tokens` in, registered as their entry: the owner's running entry's
        when it has one (moved on), else a free row or the least recently used one's. None when these tokens
        are stored already (under this bucket)."""
        tokens = list(tokens)
        for entry in self._entries.values():
            if entry.bucket == bucket and entry.tokens == tokens:
                self._entries.move_to_end(entry.row)
                return None
        running = next((e for e in self._entries.values() if owner is not None and e.owner == owner), None)
        if running is not None:
            row = running.row
        elif self._free:
            row = self._free.pop()
        else:
            row = next(iter(self._entries))  # the least recently used
        self._entries.pop(row, None)
        self._entries[row] = Entry(bucket, tokens, row, owner)
        return row

    def release(self, owner: str) -> None:
        """`owner`'s running entry stays, as an entry like any other (the request's prompt is done)."""
        for entry in self._entries.values():
            if entry.owner == owner:
                entry.owner = None

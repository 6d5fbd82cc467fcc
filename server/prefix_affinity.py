"""Which data-parallel engine holds a prompt's prefix: the HTTP side's memory of where it sent prompts, so that a
prompt that starts as an earlier one did goes to the engine whose prefix cache has the earlier one's states.

A prompt is known by the hashes of its prefixes at every `block` tokens (each hash chains the one before, as
vLLM keys its prefix cache's blocks); the newest engine to have run a prefix is remembered for it, up to `size`
prefixes, the least recently used forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixAffinity:
    def __init__(self, block: int, size: int = 65536):
        self.block = block
        self.size = size
        self._engine_of: OrderedDict[int, int] = OrderedDict()  # prefix hash → engine index

    def _hashes(self, bucket: str, prompt: Sequence[int]) -> list[int]:
        """The chained hash of each whole block of `prompt` that leaves at least one token after it (a stored
        prefix is shorter than the prompt that uses it), under `bucket`."""
        hashes, running = [], hash(bucket)
        for end in range(self.block, len(prompt), self.block):
            running = hash((running, tuple(prompt[end - self.block:end])))
            hashes.append(running)
        return hashes

    def engine(self, bucket: str, prompt: Sequence[int]) -> tuple[int | None, list[int]]:
        """The engine that ran the longest known prefix of `prompt` (None: none), and the prompt's block hashes
        (for `ran`)."""
        hashes = self._hashes(bucket, prompt)
        for key in reversed(hashes):
            if key in self._engine_of:
                self._engine_of.move_to_end(key)
                return self._engine_of[key], hashes
        return None, hashes

    def ran(self, hashes: list[int], engine: int) -> None:
        """Remembers that `engine` ran the prefixes of these hashes."""
        for key in hashes:
            self._engine_of[key] = engine
            self._engine_of.move_to_end(key)
        while len(self._engine_of) > self.size:
            self._engine_of.popitem(last=False)

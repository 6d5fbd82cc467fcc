"""Incremental detokenisation with stop strings.

Text is released only when it is final:
- never a broken UTF-8 character. A byte-level tokenizer's text is its tokens' bytes one after another: they are
  decoded as they come, an incomplete character held while its next bytes can still complete it (bytes that
  cannot go out as U+FFFD at once). Other tokenizers' text is decoded from the ids: while the decoded tail ends in
  U+FFFD (a multi-byte character split across tokens) it is held until the next token completes it, until the
  request ends, or until the oldest held token has been held longer than a character can be (it is then invalid
  bytes, which go out as U+FFFD);
- never part of a stop string: text that could be the start of a stop string is held until it is known not
  to be one; a stop string found (also one split across tokens) ends the request and is not emitted (unless
  `include_stop`: it then ends the text). While fewer than `min_tokens + 1` tokens have come, stop strings are
  not looked for (vLLM's rule).
"""

from __future__ import annotations

import codecs
from typing import Protocol

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 4  # a UTF-8 character has at most 4 bytes: past that the bytes are invalid, not incomplete


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def byte_pieces(self, skip_special_tokens: bool = False) -> list[bytes] | None: ...


class OutputText:
    def __init__(self, tokenizer: Decoder, stop: tuple[str, ...] = (), min_tokens: int = 0, include_stop: bool = False,
                 skip_special: bool = False):
        """`skip_special`: special tokens (end of text, padding) add no text."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._stop = tuple(s for s in stop if s)
        self._min_tokens = min_tokens
        self._include_stop = include_stop
        self._pieces = tokenizer.byte_pieces(skip_special)  # each id's bytes; None: decoded from the ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # with `_pieces`
        self._ids: list[int] = []
        self._prefix = 0  # without `_pieces`: ids[prefix:read] decode to text taken into `text`; kept as context
        self._read = 0
        # decoded (complete characters) and not yet handed out: the text since the last release, and a held tail
        # that could begin a stop string. Only this is kept: a stop string cannot begin in text already handed out
        # (it would have been held), and a string that grew with each token would be copied whole each time.
        self._pending = ""
        self.stopped = False  # a stop string was found
        self.stop_string: str | None = None  # which one

    def push(self, token_id: int) -> str:
        """Adds one generated token; returns the text that became final (possibly empty)."""
        assert not self.stopped, "no tokens after a stop string"
        self._ids.append(token_id)
        if self._pieces is not None:
            self._pending += self._utf8.decode(self._pieces[token_id])
        elif not self._decode_ids():
            return ""  # an incomplete character: wait for its next bytes
        return self._release()

    def _decode_ids(self) -> bool:
        """Without `_pieces`: the text the ids read so far add; False while the tail is held."""
        full, end = self._decoded(len(self._ids)), len(self._ids)
        if full.endswith(REPLACEMENT):
            if end - self._read < MAX_HELD_TOKENS:
                return False
            # The oldest held token cannot begin a character still incomplete (it would have too many bytes): the
            # held tokens up to the last one that ends a whole character go out (else the oldest alone), and the
            # rest stay held, since a character may have begun after them.
            end = next((k for k in range(end - 1, self._read + 1, -1) if not self._decoded(k).endswith(REPLACEMENT)),
                       self._read + 1)
            full = self._decoded(end)
        self._pending += full[len(self._decoded(self._read)):]
        self._prefix, self._read = self._read, end
        return True

    def _decoded(self, end: int) -> str:
        """The text of ids[prefix:end]: those since `prefix`, whose first ones are context for the rest."""
        return self._tokenizer.decode(self._ids[self._prefix:end], self._skip_special)

    def finish(self) -> str:
        """The request ends (length, end of text, timeout): hand out whatever is held, broken characters too."""
        if not self.stopped:
            if self._pieces is not None:
                self._pending += self._utf8.decode(b"", final=True)
            else:
                self._pending += self._decoded(len(self._ids))[len(self._decoded(self._read)):]
                self._read = len(self._ids)
        out, self._pending = self._pending, ""
        return out

    def _release(self) -> str:
        if not self._stop:  # every decoded character is final: the common case, once per token
            out, self._pending = self._pending, ""
            return out
        searched = self._stop if len(self._ids) > self._min_tokens else ()
        hits = [(i, s) for i, s in ((self._pending.find(s), s) for s in searched) if i >= 0]
        if hits:
            at, self.stop_string = min(hits, key=lambda hit: hit[0])
            self._pending = self._pending[:at + len(self.stop_string) if self._include_stop else at]
            self.stopped = True
            return self.finish()
        end = len(self._pending) - self._partial_stop_len()
        out, self._pending = self._pending[:end], self._pending[end:]
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

"""Tokenizers from `tokenizer.json` files (Hugging Face `tokenizers`), found beside the model or given."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders

from .errors import RuntimeErrorBase

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


def _byte_level_alphabet() -> dict[str, int]:
    """The character that stands for each byte in a byte-level BPE's vocabulary (GPT-2's table, which the
    `tokenizers` ByteLevel pre-tokenizer uses but does not expose): printable bytes stand for themselves, the
    others for the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_LEVEL = _byte_level_alphabet()


class TokenizerError(RuntimeErrorBase):
    pass


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: missing tokenizer file")
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as bad:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{self.path}: not a valid tokenizer.json ({bad})") from None
        self.eos_token_id = next((i for t in EOS_TOKENS if (i := self._tok.token_to_id(t)) is not None), None)
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: token.content for i, token in added.items()}
        self._special = {i for i, token in added.items() if token.special}
        self._byte_pieces: dict[bool, list[bytes]] = {}  # by skip_special_tokens
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, encoded in parallel by the tokenizers library."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens (end of text, padding) are left out when `skip_special_tokens`."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def byte_pieces(self, skip_special_tokens: bool = False) -> list[bytes] | None:
        """Each id's bytes (special tokens none when skipped) where the text of any ids is the UTF-8 of their
        bytes one after another, invalid bytes replaced (a byte-level BPE's decoder does no more): text can then
        be decoded token by token. None for other tokenizers, whose decoders join, replace or strip across tokens."""
        if not self._byte_level:
            return None
        if skip_special_tokens not in self._byte_pieces:
            skipped = self._special if skip_special_tokens else set()
            self._byte_pieces[skip_special_tokens] = [
                b"" if i in skipped else self.token_bytes(i) for i in range(self.vocab_size)]
        return self._byte_pieces[skip_special_tokens]

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token's text, also where it holds part of a character (which `decode` of the token
        alone shows as U+FFFD): a byte-level BPE's tokens are spelt in its byte alphabet. Other tokenizers: the
        UTF-8 of the token's decoded text."""
        piece = self._tok.id_to_token(token_id)
        if self._byte_level and piece is not None and token_id not in self._added:
            return bytes(BYTE_LEVEL[c] for c in piece)
        return self.decode([token_id]).encode("utf-8")


def find_tokenizer(model_dir: str | Path, explicit: str | Path | None = None) -> Tokenizer:
    """`explicit` when given, else `tokenizer.json` in the model directory."""
    if explicit is not None:
        return Tokenizer(explicit)
    candidate = Path(model_dir) / "tokenizer.json"
    if not candidate.is_file():
        raise TokenizerError(f"{model_dir}: no tokenizer.json in the model directory; pass a tokenizer path "
                             "(state-spaces checkpoints use GPT-NeoX-20B's tokenizer.json)")
    return Tokenizer(candidate)

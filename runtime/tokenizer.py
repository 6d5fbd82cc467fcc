"""Tokenizers from `tokenizer.json` files (Hugging Face `tokenizers`), found beside the model or given."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import RuntimeErrorBase

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")


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

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def find_tokenizer(model_dir: str | Path, explicit: str | Path | None = None) -> Tokenizer:
    """`explicit` when given, else `tokenizer.json` in the model directory."""
    if explicit is not None:
        return Tokenizer(explicit)
    candidate = Path(model_dir) / "tokenizer.json"
    if not candidate.is_file():
        raise TokenizerError(f"{model_dir}: no tokenizer.json in the model directory; pass a tokenizer path "
                             "(state-spaces checkpoints use GPT-NeoX-20B's tokenizer.json)")
    return Tokenizer(candidate)

"""Tiny real byte-level BPE tokenizers for the tests, trained on a few paragraphs written here.

The text uses few distinct characters (lower case, some punctuation, "é" and "€" for multi-byte UTF-8, every
digit and the capitals of the passkey template) so that the whole vocabulary fits the tiny test models' 96 ids."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
TEXT = """\
the river ran past the old mill, and the miller's daughter sat on the bank to watch the water go by.
she counted the boats: one, two, three. each boat carried grain to the town, and each boatman waved.
in the town the baker made bread from the grain; the bread cost one euro, or 1 €, at the café.
a long context is a long road: the model must remember the start while it reads the end.
when the road is longer than any road it was trained on, the model forgets, and the answer is lost.
so we scale the step of each layer, and the model remembers again. the pass key is 4821. remember it.
what is the pass key? the pass key is 4821. the river ran on, and the mill turned, and the day ended.
The pass key is 35079. Remember it. What is the pass key? Here we go. There and back again. 0123456789
"""


def train_tokenizer(path: Path, vocab_size: int = 96) -> Path:
    """Trains on TEXT and saves tokenizer.json at `path`; the vocabulary has exactly `vocab_size` ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator(TEXT.splitlines(), trainer)
    assert tokenizer.get_vocab_size() == vocab_size, f"trained {tokenizer.get_vocab_size()} ids, wanted {vocab_size}"
    tokenizer.save(str(path))
    return path


def byte_fallback_tokenizer(path: Path) -> Path:
    """A sentencepiece-style tokenizer (Llama's layout) saved at `path`: one token per character of TEXT, "▁" for a
    space, other characters as their UTF-8 bytes in byte tokens <0xNN>, decoded by replacing "▁" and fusing the
    bytes across tokens, so that its text is not its tokens' texts one after another."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for character in sorted(set(TEXT.replace(" ", "▁").replace("\n", ""))):
        if character.isascii() or character == "▁":
            vocab.setdefault(character, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(path))
    return path

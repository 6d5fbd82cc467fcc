"""A token's bytes (what chat logprobs report): a byte-level BPE's tokens spelt back into bytes, also where a token
holds only part of a multi-byte character, and special tokens as their text."""

from runtime.tokenizer import Tokenizer

from tokenizers_for_tests import EOS, train_tokenizer


def test_token_bytes_rebuild_the_text_also_across_split_characters(tmp_path):
    tokenizer = Tokenizer(train_tokenizer(tmp_path / "tokenizer.json"))
    text = f"1 €, at the café.{EOS} €"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    split = [p for p in pieces if not _whole_characters(p)]
    assert split, "the text should split a character across tokens"
    for token_id, piece in zip(ids, pieces):
        if _whole_characters(piece):  # where decode can show the token alone, the bytes are its text
            assert piece.decode("utf-8") == tokenizer.decode([token_id])
    assert tokenizer.token_bytes(tokenizer.eos_token_id) == EOS.encode()


def _whole_characters(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True

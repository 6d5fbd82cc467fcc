"""`python -m extend.compare` end to end on a tiny model: four banks built and scored, a table and a plot."""

import json
import shutil

import pytest

from checkpoints import BOOK_TEXT, tiny_tokenizer

from extend.compare import METHODS, main
from scale_bank import Bank


@pytest.mark.slow  # a bank built per method
def test_compare_builds_every_methods_bank_and_tabulates_them(checkpoints, tmp_path):
    model = shutil.copytree(checkpoints["mamba1"], tmp_path / "model")
    tiny_tokenizer(model / "tokenizer.json")
    sentences = BOOK_TEXT.split(". ")
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"id": f"b{i}", "text": " ".join(
        sentences[(i + j) % len(sentences)] + "." for j in range(60))}) + "\n" for i in range(6)))
    out = tmp_path / "compare"
    main(["--model", str(model), "--train-data", str(books), "--eval-data", str(books), "--buckets", "96",
          "--lengths", "48,96", "--samples", "2", "--steps", "2", "--batch-size", "2", "--eval-samples", "2",
          "--training-length", "48", "--device", "cpu", "--jobs", "2", "--out", str(out)])
    for method in METHODS:
        bank = Bank.load(out / "banks" / method)
        assert bank.buckets == ["96"] and bank.entry("96").method == METHODS[method][1]
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["task"], r["length"]) for r in rows] == [("passkey", 48), ("ppl", 48), ("passkey", 96), ("ppl", 96)]
    for row in rows:
        assert set(METHODS) <= set(row)
        if row["length"] == 48:  # within the training length every method is the base model
            assert all(row[m] == row["base"] and row[f"{m}_bucket"] == "none" for m in METHODS)
    table = (out / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in ("base", *METHODS))
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"

"""`build_bank --no-recompute`: BP without per-layer recomputation calibrates the same scales."""

import json
import shutil

import pytest
import torch
from checkpoints import BOOK_TEXT, tiny_tokenizer

from extend.build_bank import main
from runtime import load_model
from scale_bank import Bank


def test_no_recompute_builds_the_bank_recomputation_builds(checkpoints, tmp_path, monkeypatch):
    model_dir = shutil.copytree(checkpoints["mamba1"], tmp_path / "model")
    tiny_tokenizer(model_dir / "tokenizer.json")
    books = tmp_path / "books.jsonl"
    sentences = BOOK_TEXT.split(". ")
    books.write_text("".join(json.dumps({"id": f"book{i}", "text": " ".join(sentences[(i + j) % len(sentences)] + "."
                                                                             for j in range(60))}) + "\n"
                             for i in range(6)))
    loaded = load_model(model_dir)
    entries, kept, recomputed = [], [], []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: recomputed.append(name) or checkpoint(*args, **kwargs))
    for name, extra in (("recompute", []), ("kept", ["--no-recompute"])):
        out = tmp_path / name
        assert main(["--model", str(model_dir), "--data", str(books), "--out", str(out), "--device", "cpu",
                     "--buckets", "96", "--task", "passkey", "--calibrator", "bp", "--granularity", "channel",
                     "--method", "a_spectrum", "--steps", "3", "--batch-size", "2", "--micro-batch-size", "1",
                     "--eval-samples", "2", "--training-length", "48", "--no-progress", *extra]) == 0
        bank = Bank.load(out, loaded.config, loaded.fingerprint)
        entries.append(bank.entry("96"))
        kept.append(bank.scale_set("96"))
    assert "recompute" in recomputed and "kept" not in recomputed
    assert entries[1].calibrator["final_loss"] == pytest.approx(entries[0].calibrator["final_loss"], rel=1e-6)
    for candidate, metrics in entries[0].metrics.items():
        assert entries[1].metrics[candidate] == pytest.approx(metrics, rel=1e-5)
    for a, b in zip(kept[1].layers, kept[0].layers):
        torch.testing.assert_close(a, b)

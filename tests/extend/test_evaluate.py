"""`python -m extend.evaluate` on a tiny model and bank: table, JSON and plot, base beside bank."""

import json
import shutil

import pytest

from checkpoints import BOOK_TEXT, tiny_tokenizer

from extend.build_bank import main as build_bank
from extend.evaluate import main as evaluate
from extend.transfer import main as transfer
from extend.data import read_documents
from extend.objectives import perplexity
from extend.tokens import TokenSource
from runtime import Decimation, load_model
from runtime.tokenizer import Tokenizer
from scale_bank import Bank, BankEntry, model_info


def test_evaluate_writes_table_json_and_plot(checkpoints, tmp_path, capsys):
    model = shutil.copytree(checkpoints["mamba1"], tmp_path / "model")
    tiny_tokenizer(model / "tokenizer.json")
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 6}) + "\n" for i in range(4)))
    assert build_bank(["--model", str(model), "--data", str(books), "--out", str(tmp_path / "bank"), "--buckets",
                       "128", "--steps", "2", "--eval-samples", "2", "--training-length", "80", "--device", "cpu",
                       "--no-progress"]) == 0
    out = tmp_path / "results"
    evaluate(["--model", str(model), "--bank", str(tmp_path / "bank"), "--lengths", "80,128,256", "--data", str(books),
              "--samples", "3", "--out", str(out), "--device", "cpu"])
    rows = json.loads((out / "results.json").read_text())["text"]  # keyed by domain: the unnamed --data is "text"
    assert [(r["task"], r["length"]) for r in rows] == [(t, n) for n in (80, 128, 256) for t in ("passkey", "ppl")]
    # identity within the training length
    assert [r["bucket"] for r in rows if r["task"] == "ppl"] == ["none", "128", "128"]
    assert all(0 <= r["base"] <= 1 for r in rows if r["task"] == "passkey")
    assert all(r["base"] > 1 for r in rows if r["task"] == "ppl")
    ppl_80 = next(r for r in rows if r["task"] == "ppl" and r["length"] == 80)
    assert ppl_80["bank"] == ppl_80["base"]  # no scales at or below the training length
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| with bank |" in (out / "results.md").read_text()
    assert "perplexity" in capsys.readouterr().out


def test_a_decimate_bucket_is_applied_and_both_perplexities_score_the_kept_tail(checkpoints, tmp_path):
    loaded = load_model(checkpoints["mamba1"])
    bank = Bank.create(tmp_path / "bank", {**model_info(loaded.config, loaded.fingerprint),
                                           "training_context_length": 80})
    params = {"layer": 0, "l_base": 40, "keep_last": 16}
    bank.add_entry(BankEntry("128", 128, "decimate", "none", "test", params=params), None)
    model = shutil.copytree(checkpoints["mamba1"], tmp_path / "model")
    tokenizer = tiny_tokenizer(model / "tokenizer.json")
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 6}) + "\n" for i in range(4)))
    out = tmp_path / "results"
    evaluate(["--model", str(model), "--bank", str(bank.path), "--lengths", "128", "--data", str(books),
              "--samples", "2", "--out", str(out), "--device", "cpu"])
    passkey, ppl = json.loads((out / "results.json").read_text())["text"]
    assert passkey["bucket"] == ppl["bucket"] == "128" and ppl["tail"] == 16 and "tail" not in passkey
    source = TokenSource(read_documents([books]), Tokenizer(tokenizer))
    decimation = Decimation(layer=0, l_base=40, keep_last=16)
    assert ppl["bank"] == perplexity(loaded.model, source, 128, 2, None, 0, 1, decimation=decimation, tail=16)
    assert ppl["base"] == perplexity(loaded.model, source, 128, 2, None, 0, 1, tail=16)
    assert ppl["bank"] != ppl["base"]  # 40 + 16 of 128 positions go on past layer 0
    assert "perplexity of the last 16 tokens at 128" in (out / "results.md").read_text()


def _model_books_and_code(checkpoints, tmp_path):
    """A tiny model with its tokenizer, a books file and a code file."""
    model = shutil.copytree(checkpoints["mamba1"], tmp_path / "model")
    tiny_tokenizer(model / "tokenizer.json")
    books, code = tmp_path / "books.jsonl", tmp_path / "code.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 6}) + "\n" for i in range(4)))
    code.write_text("".join(json.dumps({"title": f"m{i}", "text": f"def f{i}(x):\n    return x + {i}\n" * 30}) + "\n"
                            for i in range(6)))
    return model, books, code


def test_evaluate_reports_each_domain_and_template(checkpoints, tmp_path):
    model, books, code = _model_books_and_code(checkpoints, tmp_path)
    out = tmp_path / "results"
    evaluate(["--model", str(model), "--lengths", "200,256", "--data", f"books={books},code={code}", "filler",
              "--templates", "line,instructed", "--samples", "2", "--out", str(out), "--device", "cpu",
              "--training-length", "64"])
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["books", "code", "filler"]
    for domain, rows in results.items():
        passkey = [(r["length"], r["template"]) for r in rows if r["task"] == "passkey"]
        assert passkey == [(n, t) for n in (200, 256) for t in ("line", "instructed")]
        assert [r["length"] for r in rows if r["task"] == "ppl"] == ([] if domain == "filler" else [200, 256])
    table = (out / "results.md").read_text()
    assert "**passkey accuracy, by domain** (mean over templates)" in table and "| filler, base |" in table
    assert "### code" in table and "| base model, instructed |" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # a bank built per domain left out
def test_transfer_leaves_each_domain_out_and_scores_it_on_that_domain(checkpoints, tmp_path):
    model, books, code = _model_books_and_code(checkpoints, tmp_path)
    out = tmp_path / "transfer"
    transfer(["--model", str(model), "--calibration", f"books={books},code={code}@train", "--evaluation",
              f"books={books},code={code}@eval,filler", "--buckets", "96", "--lengths", "96", "--samples", "2",
              "--templates", "line", "--task", "passkey", "--jobs", "2", "--device", "cpu", "--out", str(out), "--",
              "--steps", "2", "--batch-size", "2", "--eval-samples", "2", "--training-length", "48", "--task",
              "passkey", "--calibrator", "bp", "--granularity", "channel"])
    for bank, sources in (("all", {"books", "code"}), ("without-books", {"code"}), ("without-code", {"books"})):
        assert set(Bank.load(out / "banks" / bank).entry("96").calibrator["sources"]) == sources
    results = json.loads((out / "transfer.json").read_text())
    assert list(results) == ["books", "code", "filler"]
    assert all("left_out" in r for domain in ("books", "code") for r in results[domain])
    assert not any("left_out" in r for r in results["filler"])  # never calibrated on, by any bank
    own = json.loads((out / "eval" / "without-code" / "code" / "results.json").read_text())["code"]
    assert [r["bank"] for r in own] == [r["left_out"] for r in results["code"]] and "base" not in own[0]
    table = (out / "transfer.md").read_text()
    assert "| code: bank, domain left out |" in table and "lowest template" in table
    assert (out / "transfer.png").read_bytes()[:4] == b"\x89PNG"

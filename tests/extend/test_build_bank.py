"""`python -m extend.build_bank` end to end on a tiny model, on CPU."""

import json
import shutil

import pytest
from checkpoints import BOOK_TEXT, tiny_tokenizer

from extend.build_bank import main
from extend.scoring import best_variant, choose
from runtime import Decimation, load_model
from scale_bank import Bank, BankError, select


@pytest.fixture(params=["mamba1"])
def model_dir(checkpoints, tmp_path, request):
    directory = shutil.copytree(checkpoints[request.param], tmp_path / "model")
    tiny_tokenizer(directory / "tokenizer.json")
    return directory


@pytest.fixture()
def books(tmp_path):
    path = tmp_path / "books.jsonl"
    sentences = BOOK_TEXT.split(". ")
    with open(path, "w") as f:
        for i in range(6):
            text = " ".join(sentences[(i + j) % len(sentences)] + "." for j in range(60))
            f.write(json.dumps({"id": f"book{i}", "text": text}) + "\n")
    return path


def _run(model_dir, books, out, *extra):
    return main(["--model", str(model_dir), "--data", str(books), "--out", str(out), "--device", "cpu",
                 "--steps", "3", "--batch-size", "2", "--eval-samples", "2", "--training-length", "48",
                 "--no-progress", *extra])


@pytest.mark.parametrize("model_dir,task,calibrator,granularity", [
    ("mamba1", "ppl", "zo", "layer"), ("mamba1", "passkey", "bp", "channel"), ("mamba2", "passkey", "bp", "head"),
], indirect=["model_dir"])
def test_build_bank_end_to_end(model_dir, books, tmp_path, task, calibrator, granularity):
    out = tmp_path / "bank"
    asked = "channel" if granularity == "head" else granularity  # "channel" on a Mamba2 means per head
    assert _run(model_dir, books, out, "--buckets", "96,128", "--task", task, "--calibrator", calibrator,
                "--granularity", asked) == 0
    loaded = load_model(model_dir)
    bank = Bank.load(out, loaded.config, loaded.fingerprint)
    assert bank.buckets == ["96", "128"]
    for name in bank.buckets:
        entry = bank.entry(name)
        assert entry.calibrator["name"] == calibrator and entry.granularity == granularity  # Mamba2: per head
        assert set(entry.metrics) >= {"identity", "calibrated"}
        assert entry.chosen in entry.metrics
        kept, identity = entry.metrics[entry.chosen], entry.metrics["identity"]
        if task == "ppl":
            assert kept["ppl"] <= identity["ppl"]  # never worse than identity on held-out data
        else:
            assert kept["passkey_acc"] >= identity["passkey_acc"]
        held, calibration = entry.data["held_out"], entry.data["calibration"]
        assert not set(held[0]["documents"]) & set(calibration[0]["documents"])
    # the previous bucket's scales are a candidate exactly when that bucket kept some (a tiny random model's
    # ZO step can be too small to beat identity, on some CPUs)
    assert ("previous" in bank.entry("128").metrics) == (bank.entry("96").chosen != "identity")
    assert select(bank, 100, training_length=48).name == "128"
    assert (out / "build.log").read_text().count("kept") == 2


def test_resume_keeps_finished_buckets_and_refuses_overwrite(model_dir, books, tmp_path):
    out = tmp_path / "bank"
    assert _run(model_dir, books, out, "--buckets", "96") == 0
    first = Bank.load(out).entry("96")
    assert _run(model_dir, books, out, "--buckets", "96,128") == 2  # exists, no --resume
    assert _run(model_dir, books, out, "--buckets", "96,128", "--resume") == 0
    bank = Bank.load(out)
    assert bank.buckets == ["96", "128"] and bank.entry("96") == first


def test_bad_data_is_a_clear_error(model_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert _run(model_dir, missing, tmp_path / "bank", "--buckets", "96") == 2
    assert "nowhere.jsonl: no such file" in capsys.readouterr().err


def test_a_quantised_model_gets_a_bank_of_its_own(model_dir, books, tmp_path):
    out = tmp_path / "bank"
    assert _run(model_dir, books, out, "--buckets", "96", "--quantize", "int8", "--calibrator", "zo") == 0
    quantised = load_model(model_dir, quantize="int8")
    bank = Bank.load(out, quantised.config, quantised.fingerprint, quantised.quantization)
    assert bank.manifest.model["quantization"] == "int8" and bank.buckets == ["96"]
    full = load_model(model_dir)
    with pytest.raises(BankError, match="quantization mismatch"):
        Bank.load(out, full.config, full.fingerprint, full.quantization)


@pytest.mark.parametrize("model_dir,task", [("mamba1", "passkey"), ("mamba2", "ppl")], indirect=["model_dir"])
def test_decimate_entry_is_the_best_layer_of_a_sweep_and_never_worse_than_identity(model_dir, books, tmp_path, task):
    out = tmp_path / "bank"
    assert _run(model_dir, books, out, "--buckets", "96,128", "--task", task, "--method", "decimate",
                "--decimate-keep-last", "16") == 0
    loaded = load_model(model_dir)
    bank = Bank.load(out, loaded.config, loaded.fingerprint)
    for name in ("96", "128"):
        entry = bank.entry(name)
        assert (entry.method, entry.granularity, entry.file) == ("decimate", "none", None)
        decimation = Decimation.from_params(entry.params, loaded.config.n_layer)
        assert decimation == Decimation(layer=decimation.layer, l_base=48, keep_last=16)  # L_base: training length
        sweep = entry.calibrator["sweep"]  # on the calibration documents
        assert entry.calibrator["name"] == "layer_sweep" and set(sweep) == {"identity", "0", "1"}  # not the last
        layers = {int(layer): metrics for layer, metrics in sweep.items() if layer != "identity"}
        assert decimation.layer == best_variant(task, layers, sweep["identity"])
        assert set(entry.metrics) == {"identity", "calibrated"} and entry.chosen == choose(task, entry.metrics)
        kept, identity = entry.metrics[entry.chosen], entry.metrics["identity"]
        if task == "ppl":
            assert kept["ppl"] <= identity["ppl"]
        else:
            assert kept["passkey_acc"] >= identity["passkey_acc"]
        picked = select(bank, entry.length, training_length=48)
        assert picked.method == ("decimate" if entry.chosen == "calibrated" else None)


def test_decimate_sweeps_only_the_layers_asked_for_and_checks_its_flags(model_dir, books, tmp_path, capsys):
    out = tmp_path / "bank"
    assert _run(model_dir, books, out, "--buckets", "128", "--method", "decimate", "--decimate-layers", "1",
                "--decimate-l-base", "40", "--decimate-keep-last", "8", "--decimate-min-len", "2") == 0
    entry = Bank.load(out).entry("128")
    assert entry.params == {"layer": 1, "l_base": 40, "min_len": 2, "keep_last": 8}
    assert set(entry.calibrator["sweep"]) == {"identity", "1"} and entry.calibrator["ppl_tail"] == 8
    assert _run(model_dir, books, tmp_path / "b2", "--buckets", "128", "--method", "decimate",
                "--decimate-layers", "0,7") == 2
    assert "decimation layer 7 does not exist: the model has 3 layers" in capsys.readouterr().err
    for flags, message in ((["--method", "decimate", "--calibrator", "bp"], "leave out --calibrator"),
                           (["--decimate-keep-last", "8"], "--decimate-keep-last: only for --method decimate"),
                           (["--method", "decimate", "--decimate-layers", "1,x"], "comma-separated layer indices")):
        with pytest.raises(SystemExit):
            _run(model_dir, books, tmp_path / "b3", "--buckets", "128", *flags)
        assert message in capsys.readouterr().err


def test_several_sources_are_calibrated_as_a_mixture_and_each_is_a_held_out_domain(model_dir, books, tmp_path):
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"title": f"m{i}", "text": f"def f{i}(x):\n    return x + {i}\n" * 30}) + "\n"
                            for i in range(6)))
    out = tmp_path / "bank"
    assert _run(model_dir, f"books={books},code={code}@train", out, "--buckets", "96", "--task", "passkey",
                "--calibrator", "bp", "--granularity", "channel", "--mixture", "books=2", "--templates",
                "line,inline") == 0
    # with the filler as a third domain
    assert _run(model_dir, f"books={books},filler", out.with_name("b2"), "--buckets", "96", "--task",
                "passkey", "--calibrator", "bp", "--granularity", "channel") == 0
    entry = Bank.load(out).entry("96")
    assert entry.calibrator["sources"] == {"books": {"data": str(books), "weight": 2.0},
                                           "code": {"data": f"{code}@train", "weight": 1.0}}
    assert entry.calibrator["templates"] == ["line", "inline"] and "every held-out domain" in entry.calibrator[
        "held_out_rule"]
    assert {item["path"] for item in entry.data["calibration"]} == {str(books), str(code)}
    for metrics in entry.metrics.values():
        assert {"books/passkey_acc", "books/ppl", "code/passkey_acc", "code/ppl", "passkey_acc", "ppl"} <= set(metrics)
        assert metrics["passkey_acc"] == (metrics["books/passkey_acc"] + metrics["code/passkey_acc"]) / 2
    assert entry.chosen == choose("passkey", entry.metrics)
    with_filler = Bank.load(out.with_name("b2")).entry("96").metrics["identity"]
    assert "filler/passkey_acc" in with_filler and "filler/ppl" not in with_filler  # the filler has no text


def test_the_held_out_rule_keeps_no_scales_that_make_any_domain_worse():
    identity = {"passkey_acc": 0.5, "passkey_ce": 2.0, "ppl": 10.0, "books/passkey_acc": 0.8, "books/passkey_ce": 1.0,
                "books/ppl": 10.0, "code/passkey_acc": 0.2, "code/passkey_ce": 3.0, "code/ppl": 10.0}
    better_on_average = {**identity, "passkey_acc": 0.55, "books/passkey_acc": 0.7, "code/passkey_acc": 0.4}
    assert choose("passkey", {"identity": identity, "calibrated": better_on_average}) == "identity"
    better_everywhere = {**better_on_average, "books/passkey_acc": 0.8, "passkey_acc": 0.6}
    assert choose("passkey", {"identity": identity, "calibrated": better_everywhere}) == "calibrated"
    costly = {**better_everywhere, "code/ppl": 10.0 * 1.06}  # perplexity past the tolerance on one domain
    assert choose("passkey", {"identity": identity, "calibrated": costly}) == "identity"

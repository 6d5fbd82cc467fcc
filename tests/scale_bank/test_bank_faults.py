"""Every fault of a bank is refused by `Bank.load` with a BankError naming the file and the fault."""

import dataclasses
import math

import pytest
import torch
from bank_helpers import edit_entry, edit_manifest, full_bank, rewrite_tensors

from scale_bank import Bank, BankError


def _truncate(bank_dir):
    path = bank_dir / "8k.safetensors"
    path.write_bytes(path.read_bytes()[:-7])


def _corrupt_header(bank_dir):
    path = bank_dir / "8k.safetensors"
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


def _swap_content(bank_dir):  # a valid file whose bytes are not the ones bank.json recorded
    (bank_dir / "8k.safetensors").write_bytes((bank_dir / "32k.safetensors").read_bytes())


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def _scale_at(value):  # one bad value among good ones in 8k (delta, per channel)
    def edit(tensors):
        tensors["layers.1"] = tensors["layers.1"].clone()
        tensors["layers.1"][5] = value
    return edit


def _entry_field(name, value, bucket="4k"):
    return lambda d: edit_entry(d, bucket, **{name: value})


def _manifest(edit):
    return lambda d: edit_manifest(d, edit)


def _first_entry(edit):
    return _manifest(lambda m: edit(m["entries"][0]))


# (fault id, edit of a good mamba1 bank directory, file named in the error, expected fault text)
FILE_FAULTS = [
    ("missing bank.json", lambda d: (d / "bank.json").unlink(), "bank.json", "missing file"),
    ("bad JSON", lambda d: (d / "bank.json").write_text('{"format_version": 1,'), "bank.json", "bad JSON"),
    ("not an object", lambda d: (d / "bank.json").write_text("[]"), "bank.json", "manifest: expected an object"),
    ("missing file", lambda d: (d / "8k.safetensors").unlink(), "8k.safetensors", "missing file"),
    ("truncated file", _truncate, "8k.safetensors", "truncated or corrupt"),
    ("corrupt header", _corrupt_header, "8k.safetensors", "truncated or corrupt"),
    ("hash mismatch", _swap_content, "8k.safetensors", "sha256 mismatch"),
    ("missing layer", lambda d: rewrite_tensors(d, "8k", lambda t: t.pop("layers.2")), "8k.safetensors",
     "missing tensor 'layers.2'"),
    ("extra layer", lambda d: rewrite_tensors(d, "8k", _set("layers.3", torch.ones(64))), "8k.safetensors",
     "unexpected tensor 'layers.3'"),
    ("stray key", lambda d: rewrite_tensors(d, "8k", _set("scale", torch.ones(64))), "8k.safetensors",
     "unexpected tensor 'scale'"),
    ("wrong shape", lambda d: rewrite_tensors(d, "8k", _set("layers.0", torch.ones(63))), "8k.safetensors",
     r"layers\.0: shape \(63,\) is unknown granularity"),
    ("other granularity", lambda d: rewrite_tensors(d, "8k", _set("layers.0", torch.ones(()))), "8k.safetensors",
     r"layers\.0: shape \(\) is layer granularity .* expected channel"),
    ("float64", lambda d: rewrite_tensors(d, "8k", _set("layers.0", torch.ones(64, dtype=torch.float64))),
     "8k.safetensors", "dtype torch.float64"),
    ("zero", lambda d: rewrite_tensors(d, "8k", _scale_at(0.0)), "8k.safetensors", r"layers\.1: non-positive"),
    ("negative", lambda d: rewrite_tensors(d, "8k", _scale_at(-0.5)), "8k.safetensors",
     r"layers\.1: non-positive scale \(min -0\.5\)"),
    ("NaN", lambda d: rewrite_tensors(d, "8k", _scale_at(math.nan)), "8k.safetensors", r"layers\.1: non-finite"),
    ("Inf", lambda d: rewrite_tensors(d, "8k", _scale_at(math.inf)), "8k.safetensors", r"layers\.1: non-finite"),
    ("format version", _manifest(lambda m: m.update(format_version=2)), "bank.json", "unsupported version 2"),
    ("unknown top field", _manifest(lambda m: m.update(comment="hi")), "bank.json", "manifest.comment: unknown field"),
    ("missing model field", _manifest(lambda m: m["model"].pop("fingerprint")), "bank.json",
     "model.fingerprint: missing field"),
    ("unknown arch", _manifest(lambda m: m["model"].update(arch="mamba3")), "bank.json", "unknown arch 'mamba3'"),
    ("unknown method", _entry_field("method", "lora"), "bank.json", r"entries\[0\]\.method: unknown method 'lora'"),
    ("unknown granularity", _entry_field("granularity", "token"), "bank.json",
     r"entries\[0\]\.granularity: unknown granularity 'token'"),
    ("head on mamba1", _entry_field("granularity", "head", "8k"), "bank.json",
     r"entries\[1\]\.granularity: 'head' does not exist for a mamba1 model"),
    ("decimate with granularity", _entry_field("granularity", "layer", "128k"), "bank.json",
     r"entries\[5\]\.granularity: 'layer' does not go with method 'decimate'"),
    ("decimate with file", _entry_field("file", "128k.safetensors", "128k"), "bank.json",
     r"entries\[5\]\.file: method 'decimate' stores no tensors"),
    ("duplicate bucket", _manifest(lambda m: m["entries"].append(dict(m["entries"][0]))), "bank.json",
     r"entries\[6\]\.bucket: duplicate bucket '4k'"),
    ("duplicate length",
     _manifest(lambda m: m["entries"][1].update(bucket="4096", length=4096, file="4096.safetensors")),
     "bank.json", r"entries\[1\]\.length: duplicate length 4096"),
    ("zero length", _entry_field("length", 0), "bank.json", r"entries\[0\]\.length: must be a positive"),
    ("negative length", _entry_field("length", -4096), "bank.json", r"entries\[0\]\.length: must be a positive"),
    ("name contradicts length", _entry_field("length", 5000), "bank.json", r"bucket '4k' names 4096"),
    ("length as string", _entry_field("length", "4096"), "bank.json", r"entries\[0\]\.length: expected int, got str"),
    ("bool as int", _entry_field("seed", True), "bank.json", r"entries\[0\]\.seed: expected int or null, got bool"),
    ("unknown entry field", _first_entry(lambda e: e.update(note="x")), "bank.json",
     r"entries\[0\]\.note: unknown field"),
    ("missing entry field", _first_entry(lambda e: e.pop("created")), "bank.json",
     r"entries\[0\]\.created: missing field"),
    ("reserved name", _manifest(lambda m: m["entries"][0].update(bucket="auto", file="auto.safetensors")),
     "bank.json", r"entries\[0\]\.bucket: bad bucket name 'auto'"),
    ("path in file", _entry_field("file", "../4k.safetensors"), "bank.json", r"entries\[0\]\.file: expected '4k"),
    ("bad sha256", _entry_field("sha256", "xyz"), "bank.json", r"entries\[0\]\.sha256: expected 64"),
    ("bad time", _entry_field("created", "yesterday"), "bank.json", r"entries\[0\]\.created: not an ISO 8601"),
    ("calibrator without name", _entry_field("calibrator", {"lr": 0.1}), "bank.json",
     r"entries\[0\]\.calibrator: needs a string 'name'"),
    ("unknown choice", _entry_field("chosen", "best"), "bank.json", r"entries\[0\]\.chosen: unknown choice 'best'"),
    ("chosen without metrics", _entry_field("chosen", "previous"), "bank.json",
     r"entries\[0\]\.metrics: chosen is 'previous' but there are no 'previous' metrics"),
    ("metric not a number", _entry_field("metrics", {"identity": {"ppl": "high"}, "calibrated": {"ppl": 1.0}}),
     "bank.json", r"entries\[0\]\.metrics\.identity\.ppl: expected a finite number"),
    ("held-out overlaps calibration", _first_entry(lambda e: e["data"]["held_out"].append(e["data"]["calibration"][0])),
     "bank.json",
     r"entries\[0\]\.data\.held_out\[1\]: 'data/cal\.txt' shares documents with the calibration data \(a, b\)"),
    ("documents not ids", _first_entry(lambda e: e["data"]["calibration"][0].update(documents=3)), "bank.json",
     r"entries\[0\]\.data\.calibration\[0\]\.documents: expected list"),
    ("data file without hash", _first_entry(lambda e: e["data"]["calibration"][0].pop("sha256")), "bank.json",
     r"entries\[0\]\.data\.calibration\[0\]\.sha256: missing field"),
]


@pytest.mark.parametrize("edit, file, fault", [f[1:] for f in FILE_FAULTS], ids=[f[0] for f in FILE_FAULTS])
def test_fault_is_refused_naming_file_and_fault(loaded, tmp_path, edit, file, fault):
    bank_dir = tmp_path / "bank"
    full_bank(bank_dir, loaded["mamba1"])
    Bank.load(bank_dir)  # good before the edit
    edit(bank_dir)
    with pytest.raises(BankError, match=fault) as refused:
        Bank.load(bank_dir)
    assert refused.value.path == str(bank_dir / file)
    assert str(refused.value).startswith(f"{bank_dir / file}: ")


def test_missing_directory(tmp_path):
    with pytest.raises(BankError, match="not a directory") as refused:
        Bank.load(tmp_path / "nowhere")
    assert refused.value.path == str(tmp_path / "nowhere")


# Faults of a good bank loaded for the wrong model: (id, bank's model-record overrides, load's model arguments,
# expected fault); "m1"/"m2" stand for the tiny mamba1/mamba2 model.
MODEL_FAULTS = [
    ("wrong fingerprint", {"fingerprint": "0" * 32}, ("m1", "fingerprint"), None,
     "bank is for another model: bank fingerprint 0{32}, model fingerprint {fp}"),
    ("fingerprint alone", {"fingerprint": "0" * 32}, (None, "fingerprint"), None, "bank fingerprint 0{32}"),
    ("bank int8, model not", {"quantization": "int8"}, ("m1", "fingerprint"), None,
     "quantization mismatch: bank calibrated on the int8 model, this model is unquantised"),
    ("bank not, model int8", {}, ("m1", "fingerprint"), "int8",
     "quantization mismatch: bank calibrated on the unquantised model, this model is int8"),
    ("int6 against int8", {"quantization": "int6"}, ("m1", "fingerprint"), "int8",
     "bank calibrated on the int6 model, this model is int8"),
    ("other arch", {}, ("m2", None), None, "bank arch = 'mamba1', model arch = 'mamba2'"),
    ("other n_layer", {}, ("m1 with 4 layers", None), None, "bank n_layer = 3, model n_layer = 4"),
    ("other training length", {"training_context_length": 2048}, ("m1 trained at 1024", None), None,
     "trained at 2048 tokens, this one at 1024"),
]


@pytest.mark.parametrize("overrides, model_args, quantization, fault", [f[1:] for f in MODEL_FAULTS],
                         ids=[f[0] for f in MODEL_FAULTS])
def test_bank_for_another_model_is_refused(loaded, tmp_path, overrides, model_args, quantization, fault):
    m1, m2 = loaded["mamba1"], loaded["mamba2"]
    configs = {None: None, "m1": m1.config, "m2": m2.config,
               "m1 with 4 layers": dataclasses.replace(m1.config, n_layer=4),
               "m1 trained at 1024": dataclasses.replace(m1.config, training_context_length=1024)}
    config, fingerprint = configs[model_args[0]], m1.fingerprint if model_args[1] else None
    full_bank(tmp_path / "bank", m1, **overrides)
    with pytest.raises(BankError, match=fault.replace("{fp}", m1.fingerprint)) as refused:
        Bank.load(tmp_path / "bank", config, fingerprint, quantization)
    assert refused.value.path == str(tmp_path / "bank" / "bank.json")


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_bank_for_this_model_loads(loaded, tmp_path, quantization):
    m1 = loaded["mamba1"]
    full_bank(tmp_path / "bank", m1, quantization=quantization)
    assert Bank.load(tmp_path / "bank", m1.config, m1.fingerprint, quantization).buckets
    assert Bank.load(tmp_path / "bank").buckets  # without a model, nothing model-specific is checked

"""A bank written with `Bank.create` / `add_entry` reads back whole: manifest, tensors, every method and granularity."""

import json

import pytest
import torch
from bank_helpers import KINDS, add, full_bank, make_entry, random_scales

from scale_bank import Bank, BankEntry, BankError, BankManifest, UnknownBucketError


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_round_trip_every_kind(loaded, tmp_path, arch):
    model = loaded[arch]
    written, given = full_bank(tmp_path / "bank", model)
    bank = Bank.load(tmp_path / "bank", model.config, model.fingerprint)

    assert bank.buckets == [bucket for bucket, _, _ in KINDS[arch]]
    assert bank.manifest == written.manifest
    for bucket, method, granularity in KINDS[arch]:
        entry = bank.entry(bucket)
        assert (entry.method, entry.granularity) == (method, granularity)
        scales = bank.scale_set(bucket)
        if method == "decimate":
            assert scales is None and entry.file is None and entry.sha256 is None
            assert entry.params["l_base"] == 2048
            assert not (tmp_path / "bank" / f"{bucket}.safetensors").exists()
        else:
            assert scales.method.value == method
            assert scales.granularity(model.config) == given[bucket].granularity(model.config) == granularity
            assert all(torch.equal(a, b) for a, b in zip(scales.layers, given[bucket].layers, strict=True))
            scales.validate(model.config, bucket)  # the runtime accepts what the bank returns


def test_manifest_json_round_trip(loaded, tmp_path):
    bank, _ = full_bank(tmp_path / "bank", loaded["mamba1"])
    on_disk = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert on_disk == bank.manifest.to_json()
    assert BankManifest.from_json(on_disk, "bank.json") == bank.manifest
    entry = bank.entry("8k")
    assert BankEntry.from_json(entry.to_json(), "bank.json") == entry


def test_entries_sorted_by_length_whatever_the_order_added(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = Bank.create(tmp_path / "bank", _info(model))
    for bucket in ("16k", "1.5k", "64k", "4k"):
        add(bank, model.config, bucket)
    assert bank.buckets == ["1.5k", "4k", "16k", "64k"]
    assert Bank.load(tmp_path / "bank").buckets == ["1.5k", "4k", "16k", "64k"]


def test_replace_entry(loaded, tmp_path):
    model = loaded["mamba1"]
    bank, _ = full_bank(tmp_path / "bank", model)
    old_hash = bank.entry("8k").sha256
    stored, scales = add(bank, model.config, "8k", "delta", "layer", seed=99, chosen="identity",
                         metrics={"identity": {"ppl": 3.0}, "calibrated": {"ppl": 3.5}})
    assert stored.sha256 != old_hash

    again = Bank.load(tmp_path / "bank")
    assert again.buckets == bank.buckets  # replaced in place, not added
    assert again.entry("8k") == stored and again.entry("8k").granularity == "layer"
    assert all(torch.equal(a, b) for a, b in zip(again.scale_set("8k").layers, scales.layers, strict=True))


def test_replace_tensor_entry_with_decimate_removes_its_file(loaded, tmp_path):
    model = loaded["mamba1"]
    bank, _ = full_bank(tmp_path / "bank", model)
    add(bank, model.config, "4k", "decimate", "none")
    assert not (tmp_path / "bank" / "4k.safetensors").exists()
    assert Bank.load(tmp_path / "bank").scale_set("4k") is None
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == sorted(  # no temporary files left behind
        ["bank.json"] + [f"{b}.safetensors" for b, m, _ in KINDS["mamba1"] if m != "decimate" and b != "4k"])


@pytest.mark.parametrize("scales_kind, entry_kind, fault", [
    (None, ("delta", "layer"), "needs scales"),
    (("delta", "layer"), ("decimate", "none"), "takes no scales"),
    (("a_spectrum", "layer"), ("delta", "layer"), "scales of method 'a_spectrum'"),
    (("delta", "channel"), ("delta", "layer"), "is channel granularity"),
    (("delta", "channel_state"), ("delta", "channel_state"), "only for method 'a_spectrum'"),
])
def test_add_entry_refuses_inconsistent_input_and_writes_nothing(loaded, tmp_path, scales_kind, entry_kind, fault):
    model = loaded["mamba1"]
    bank, _ = full_bank(tmp_path / "bank", model)
    before = {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir()}
    scales = None if scales_kind is None else random_scales(model.config, *scales_kind)
    with pytest.raises(BankError, match=fault):
        bank.add_entry(make_entry("4k", *entry_kind), scales)
    assert {p.name: p.read_bytes() for p in (tmp_path / "bank").iterdir()} == before
    assert Bank.load(tmp_path / "bank").manifest == bank.manifest


def test_add_entry_refuses_bad_scales(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = Bank.create(tmp_path / "bank", _info(model))
    scales = random_scales(model.config, "delta", "layer")
    bad = type(scales)(scales.method, scales.layers[:-1] + (torch.tensor(-1.0),))
    with pytest.raises(BankError, match=r"4k\.safetensors: layers\.2: non-positive"):
        bank.add_entry(make_entry("4k"), bad)
    assert not (tmp_path / "bank" / "4k.safetensors").exists() and bank.buckets == []


def test_add_entry_refuses_a_second_bucket_of_the_same_length(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = Bank.create(tmp_path / "bank", _info(model))
    add(bank, model.config, "4k")
    with pytest.raises(BankError, match="duplicate length 4096"):
        bank.add_entry(make_entry("4096"), random_scales(model.config, "delta", "layer"))


def test_create_refuses_an_existing_bank(loaded, tmp_path):
    Bank.create(tmp_path / "bank", _info(loaded["mamba1"]))
    with pytest.raises(BankError, match="a bank already exists here"):
        Bank.create(tmp_path / "bank", _info(loaded["mamba1"]))


def test_create_validates_the_model_record(loaded, tmp_path):
    with pytest.raises(BankError, match=r"model\.n_layer: expected int"):
        Bank.create(tmp_path / "bank", {**_info(loaded["mamba1"]), "n_layer": "3"})
    assert not (tmp_path / "bank").exists()


def test_entry_lookup(loaded, tmp_path):
    bank, _ = full_bank(tmp_path / "bank", loaded["mamba1"])
    assert bank.entry("8192").bucket == "8k"  # a length finds the bucket of that length
    with pytest.raises(UnknownBucketError, match=r"'3k' \(known: 4k, 8k, 16k, 32k, 64k, 128k"):
        bank.entry("3k")


def _info(model):
    from scale_bank import model_info

    return model_info(model.config, model.fingerprint)


def test_one_file_may_feed_both_parts_with_different_documents(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = Bank.create(tmp_path / "bank", _info(model))
    shared = {"path": "books.jsonl.xz", "sha256": "c" * 64}
    data = {"calibration": [{**shared, "documents": ["1", "2"]}], "held_out": [{**shared, "documents": ["3"]}]}
    add(bank, model.config, "4k", data=data)
    assert Bank.load(tmp_path / "bank").entry("4k").data == data

"""The bucket selection policy (scale_bank.selection), table-driven, on real banks."""

import pytest
import torch
from bank_helpers import add

from runtime import IDENTITY
from scale_bank import Bank, UnknownBucketError, model_info, select


def _bank(tmp_path, model, buckets: str | None, training_length: int | None = None) -> Bank | None:
    """A bank of delta per-layer entries named `buckets` ("4k,8k"); None for None."""
    if buckets is None:
        return None
    info = {**model_info(model.config, model.fingerprint), "training_context_length": training_length}
    bank = Bank.create(tmp_path / "bank", info)
    for i, bucket in enumerate(filter(None, buckets.split(","))):
        add(bank, model.config, bucket, seed=i)
    return bank


# (training_length, buckets (None: no bank), n_tokens, requested) → (name, beyond_largest)
TABLE = [
    (2048, "4k,8k,16k", 100, "auto", "none", False),
    (2048, "4k,8k,16k", 2048, "auto", "none", False),  # at the training length: identity
    (2048, "4k,8k,16k", 2049, "auto", "4k", False),
    (2048, "4k,8k,16k", 4096, "auto", "4k", False),  # a bucket covers its own length
    (2048, "4k,8k,16k", 4097, "auto", "8k", False),
    (2048, "4k,8k,16k", 16384, "auto", "16k", False),
    (2048, "4k,8k,16k", 16385, "auto", "16k", True),  # past the largest: the largest, said so
    (2048, "4k,8k,16k", 1_000_000, "auto", "16k", True),
    (8192, "4k,8k,16k", 8192, "auto", "none", False),  # buckets at or below the training length never auto-apply
    (8192, "4k,8k,16k", 8193, "auto", "16k", False),
    (None, "4k,8k", 10, "auto", "4k", False),  # unknown training length: the smallest bucket that covers n
    (2048, "", 50_000, "auto", "none", False),  # empty bank
    (2048, None, 50_000, "auto", "none", False),  # no bank
    (2048, "4k,8k", 100, "8k", "8k", False),  # a named bucket beats the training length
    (2048, "4k,8k", 100_000, "4k", "4k", False),  # ... and the length: asked for, not beyond
    (2048, "4k,8k", 5000, "8192", "8k", False),  # a length finds its bucket
    (2048, "4k,8k", 5000, "none", "none", False),
    (2048, None, 5000, "none", "none", False),
]


@pytest.mark.parametrize("training_length, buckets, n_tokens, requested, name, beyond", TABLE)
def test_policy_table(loaded, tmp_path, training_length, buckets, n_tokens, requested, name, beyond):
    bank = _bank(tmp_path, loaded["mamba1"], buckets)
    picked = select(bank, n_tokens, requested, training_length)
    assert (picked.name, picked.beyond_largest) == (name, beyond), picked.reason
    if name == "none":
        assert picked.entry is None and picked.extension is IDENTITY and picked.method is None
    else:
        assert picked.entry is bank.entry(name) and picked.extension.scales is bank.scale_set(name)
        assert picked.method == "delta"
        assert select(bank, n_tokens, requested, training_length).extension is picked.extension  # one per entry


@pytest.mark.parametrize("n_tokens, requested, reason", [
    (1000, "auto", "identity: within training length"),
    (5000, "auto", "bucket 8k: smallest ≥ n (5000 tokens)"),
    (20_000, "auto", "largest bucket 16k: request exceeds every bucket (20000 tokens)"),
    (5000, "none", "requested none"),
    (5000, "4k", "requested 4k"),
])
def test_reasons(loaded, tmp_path, n_tokens, requested, reason):
    bank = _bank(tmp_path, loaded["mamba1"], "4k,8k,16k")
    assert select(bank, n_tokens, requested, 2048).reason == reason


def test_training_length_defaults_to_the_banks(loaded, tmp_path):
    bank = _bank(tmp_path, loaded["mamba1"], "4k,8k", training_length=4096)
    assert select(bank, 4096).name == "none"
    assert select(bank, 4097).name == "8k"
    assert select(bank, 4096, training_length=2048).name == "4k"  # an explicit length wins


def test_unknown_bucket_lists_the_known_ones(loaded, tmp_path):
    bank = _bank(tmp_path, loaded["mamba1"], "4k,8k")
    with pytest.raises(UnknownBucketError, match=r"'3k' \(known: 4k, 8k") as refused:
        select(bank, 100, "3k", 2048)
    assert isinstance(refused.value, ValueError) and refused.value.known == ["4k", "8k"]
    with pytest.raises(UnknownBucketError, match="'4k'"):
        select(None, 100, "4k", 2048)


def test_identity_kept_entry_reports_its_bucket_without_scales(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = _bank(tmp_path, model, "4k")
    add(bank, model.config, "8k", chosen="identity", metrics={"identity": {"ppl": 9.0}, "calibrated": {"ppl": 9.5}})
    picked = select(bank, 5000, "auto", 2048)
    assert (picked.name, picked.entry.bucket, picked.extension, picked.method) == ("8k", "8k", IDENTITY, None)
    assert "kept identity" in picked.reason
    assert bank.scale_set("8k") is not None  # the tensors are stored all the same


def test_decimate_entry_carries_params_not_scales(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = _bank(tmp_path, model, "4k")
    add(bank, model.config, "8k", "decimate", "none")
    picked = select(bank, 5000, "auto", 2048)
    assert (picked.name, picked.extension.scales, picked.method) == ("8k", None, "decimate")
    assert picked.entry.params["l_base"] == 2048 == picked.extension.decimation.l_base


def test_selected_scales_are_the_stored_ones(loaded, tmp_path):
    model = loaded["mamba1"]
    bank = _bank(tmp_path, model, "")
    _, given = add(bank, model.config, "8k", "delta", "channel", seed=7)
    picked = select(Bank.load(tmp_path / "bank"), 5000, "auto", 2048)
    assert all(torch.equal(a, b) for a, b in zip(picked.extension.scales.layers, given.layers, strict=True))


def test_negative_length_is_refused(loaded, tmp_path):
    with pytest.raises(ValueError, match="n_tokens must be ≥ 0"):
        select(_bank(tmp_path, loaded["mamba1"], "4k"), -1)

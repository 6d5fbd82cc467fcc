"""Building and editing banks for the scale_bank tests, through the real API (nothing mocked)."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runtime import LoadedModel, ModelConfig, ScaleMethod, ScaleSet
from scale_bank import Bank, BankEntry, model_info, parse_length

VERSION = "0.1.0-test"

# Every method and granularity each architecture accepts, one bucket each: (bucket, method, granularity).
KINDS = {
    "mamba1": [("4k", "delta", "layer"), ("8k", "delta", "channel"), ("16k", "a_spectrum", "layer"),
               ("32k", "a_spectrum", "channel"), ("64k", "a_spectrum", "channel_state"), ("128k", "decimate", "none")],
    "mamba2": [("4k", "delta", "layer"), ("8k", "delta", "head"), ("16k", "a_spectrum", "layer"),
               ("32k", "a_spectrum", "head"), ("64k", "decimate", "none")],
}
DECIMATE_PARAMS = {"layer": 1, "l_base": 2048, "beta": 0.5, "min_len": 64, "keep_last": 16}


def random_scales(config: ModelConfig, method: str, granularity: str, seed: int = 0) -> ScaleSet:
    """Positive scales in [0.5, 1.5), of the shape `granularity` has on `config`."""
    shape = {"layer": (), "channel": (config.scale_channels,), "head": (config.scale_channels,),
             "channel_state": (config.d_inner, config.d_state)}[granularity]
    g = torch.Generator().manual_seed(seed)
    return ScaleSet(ScaleMethod(method), tuple(torch.rand(shape, generator=g) + 0.5 for _ in range(config.n_layer)))


def make_entry(bucket: str, method: str = "delta", granularity: str = "layer", **fields) -> BankEntry:
    """An entry as a build would record it; `fields` override the defaults."""
    fields.setdefault("params", DECIMATE_PARAMS if method == "decimate" else {})
    fields.setdefault("calibrator", {"name": "zo", "lr": 0.001, "c": 0.1, "steps": 50})
    fields.setdefault("seed", 1234)
    fields.setdefault("data", {"calibration": [{"path": "data/cal.txt", "sha256": "a" * 64, "documents": ["a", "b"]}],
                               "held_out": [{"path": "data/held.txt", "sha256": "b" * 64, "documents": ["c"]}]})
    fields.setdefault("metrics", {"identity": {"ppl": 444.0}, "calibrated": {"ppl": 12.5}})
    return BankEntry(bucket, parse_length(bucket), method, granularity, VERSION, **fields)


def add(bank: Bank, config: ModelConfig, bucket: str, method: str = "delta", granularity: str = "layer",
        seed: int = 0, **fields) -> tuple[BankEntry, ScaleSet | None]:
    """Adds an entry with random scales (none for decimate); returns it as stored, and the scales given."""
    scales = None if method == "decimate" else random_scales(config, method, granularity, seed)
    return bank.add_entry(make_entry(bucket, method, granularity, **fields), scales), scales


def full_bank(path: Path, model: LoadedModel, **model_overrides) -> tuple[Bank, dict[str, ScaleSet | None]]:
    """A bank holding one entry of every kind `model`'s architecture accepts; returns it and the scales given."""
    bank = Bank.create(path, {**model_info(model.config, model.fingerprint), **model_overrides})
    given = {}
    for i, (bucket, method, granularity) in enumerate(KINDS[model.config.arch]):
        given[bucket] = add(bank, model.config, bucket, method, granularity, seed=i)[1]
    return bank, given


def edit_manifest(bank_dir: Path, edit) -> None:
    """Applies `edit(dict)` to bank.json in place."""
    data = json.loads((bank_dir / "bank.json").read_text())
    edit(data)
    (bank_dir / "bank.json").write_text(json.dumps(data))


def edit_entry(bank_dir: Path, bucket: str, **changes) -> None:
    edit_manifest(bank_dir, lambda m: [e.update(changes) for e in m["entries"] if e["bucket"] == bucket])


def rewrite_tensors(bank_dir: Path, bucket: str, edit) -> None:
    """Applies `edit(tensors)` to a bucket's file and records the new hash, so only the edit is at fault."""
    path = bank_dir / f"{bucket}.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    edit_entry(bank_dir, bucket, sha256=hashlib.sha256(path.read_bytes()).hexdigest())

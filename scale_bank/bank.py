"""A bank on disk (docs/ARCHITECTURE.md): `bank.json` plus one `<bucket>.safetensors` per entry with tensors.

`Bank.load` reads and checks everything before returning (manifest, every file's integrity and hash, every
tensor's key, dtype, shape and values, and the model it belongs to), so a bank is either whole or refused
with a BankError naming the file and the fault. `Bank.add_entry` writes through the same checks, each file
atomically (temporary file, then rename), `bank.json` last: it never names a missing file, and a crash between
the two renames leaves a hash mismatch that `load` refuses, never wrong scales served silently.

Tensor files hold `layers.0` … `layers.{n_layer-1}`, float32, positive and finite, each of shape () per layer,
(d,) per channel (Mamba1) / (h,) per head (Mamba2), or (d, n) per channel and state (Mamba1 a_spectrum).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from runtime import IDENTITY, Decimation, DecimationError, Extension, ModelConfig, ScaleMethod, ScaleSet, ScaleSetError
from runtime.scales import Granularity, ScaleShapes, check_scales

from .buckets import parse_length
from .errors import BankError, UnknownBucketError
from .manifest import TENSOR_METHODS, BankEntry, BankManifest

MANIFEST = "bank.json"


def model_info(config: ModelConfig, fingerprint: str, quantization: str | None = None) -> dict[str, Any]:
    """The manifest's `model` record for a loaded model (`LoadedModel.config`, `.fingerprint`)."""
    return {"fingerprint": fingerprint, "arch": config.arch, "n_layer": config.n_layer, "d_inner": config.d_inner,
            "d_state": config.d_state, "scale_channels": config.scale_channels,
            "training_context_length": config.training_context_length, "quantization": quantization}


@dataclass
class Bank:
    path: Path  # the bank directory
    manifest: BankManifest
    scale_sets: dict[str, ScaleSet]  # bucket → its scales, for every entry whose method holds tensors
    # (bucket, training length) → the entry's extension, one object per entry for as long as the bank is unchanged
    _extensions: dict[tuple[str, int | None], Extension] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig | None = None, fingerprint: str | None = None,
             quantization: str | None = None) -> Bank:
        """Reads and checks the whole bank. Given a model (`config` and/or `fingerprint`), also refuses a bank
        built for another one; `quantization` is then the model's (None: unquantised) and must match the bank's."""
        path = Path(path)
        manifest = _read_manifest(path / MANIFEST)
        if config is not None or fingerprint is not None:
            _check_model(manifest.model, path / MANIFEST, config, fingerprint, quantization)
        scale_sets = {entry.bucket: _read_scales(path / entry.file, entry, manifest.model)
                      for entry in manifest.entries if entry.file is not None}
        return cls(path, manifest, scale_sets)

    @classmethod
    def create(cls, path: str | Path, model_info: dict) -> Bank:
        """A new bank without entries; the directory may exist but must not hold a bank already."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise BankError(path / MANIFEST, "a bank already exists here")
        manifest = BankManifest.from_json(BankManifest(model_info).to_json(), path / MANIFEST)
        path.mkdir(parents=True, exist_ok=True)
        _write_atomic(path / MANIFEST, _manifest_bytes(manifest))
        return cls(path, manifest, {})

    @property
    def buckets(self) -> list[str]:
        """Bucket names, shortest first."""
        return [entry.bucket for entry in self.manifest.entries]

    def entry(self, name: str) -> BankEntry:
        """The entry named `name`, or else the one whose length `name` spells ("8192" finds "8k")."""
        for entry in self.manifest.entries:
            if entry.bucket == name:
                return entry
        try:
            length = parse_length(name)
        except ValueError:
            length = None
        for entry in self.manifest.entries:
            if entry.length == length:
                return entry
        raise UnknownBucketError(name, self.buckets)

    def scale_set(self, name: str) -> ScaleSet | None:
        """The entry's scales; None for a method without tensors (decimate: read `entry(name).params`)."""
        return self.scale_sets.get(self.entry(name).bucket)

    def extension(self, name: str, training_length: int | None) -> Extension:
        """What the entry applies: its scales, its decimation (`l_base` defaulting to `training_length`), or
        IDENTITY where its build kept identity. The same object for every call while the bank is unchanged.
        Raises BankError when a decimate entry's params do not fit the model."""
        entry = self.entry(name)
        if entry.chosen == "identity":  # the build found nothing better than no extension for this bucket
            return IDENTITY
        key = (entry.bucket, training_length)
        if key not in self._extensions:
            if entry.method == "decimate":
                try:
                    decimation = Decimation.from_params(entry.params, self.manifest.model["n_layer"], training_length)
                except DecimationError as bad:
                    raise BankError(self.path / MANIFEST, f"bucket {entry.bucket}: {bad}") from None
                self._extensions[key] = Extension(decimation=decimation)
            else:
                self._extensions[key] = Extension(scales=self.scale_sets[entry.bucket])
        return self._extensions[key]

    def add_entry(self, entry: BankEntry, scales: ScaleSet | None) -> BankEntry:
        """Stores `entry` (replacing one of the same bucket name) with its scales; returns it as stored, with
        `file` and `sha256` filled in. Nothing is written unless the entry and its scales pass every check."""
        manifest_path = self.path / MANIFEST
        if (entry.method in TENSOR_METHODS) != (scales is not None):
            raise BankError(manifest_path, f"entry {entry.bucket!r}: method {entry.method!r} "
                                           f"{'needs' if scales is None else 'takes no'} scales")
        blob = None
        if scales is not None:
            if scales.method.value != entry.method:
                raise BankError(manifest_path, f"entry {entry.bucket!r}: method {entry.method!r}, "
                                               f"scales of method {scales.method.value!r}")
            blob = safetensors.torch.save({f"layers.{i}": scale.detach().to("cpu", torch.float32).contiguous()
                                           for i, scale in enumerate(scales.layers)})
            entry = dataclasses.replace(entry, file=f"{entry.bucket}.safetensors",
                                        sha256=hashlib.sha256(blob).hexdigest())
        else:
            entry = dataclasses.replace(entry, file=None, sha256=None)
        kept = [e for e in self.manifest.entries if e.bucket != entry.bucket]
        replaced = [e for e in self.manifest.entries if e.bucket == entry.bucket]
        manifest = dataclasses.replace(self.manifest, entries=tuple(kept) + (entry,))
        manifest = BankManifest.from_json(manifest.to_json(), manifest_path)  # checks and sorts
        scale_sets = {bucket: s for bucket, s in self.scale_sets.items() if bucket != entry.bucket}
        if blob is not None and entry.file is not None:
            scale_sets[entry.bucket] = _scale_set(safetensors.torch.load(blob), entry, manifest.model,
                                                  self.path / entry.file)
            _write_atomic(self.path / entry.file, blob)
        _write_atomic(manifest_path, _manifest_bytes(manifest))
        for old in replaced:
            if old.file is not None and old.file != entry.file:
                (self.path / old.file).unlink(missing_ok=True)
        self.manifest, self.scale_sets = manifest, scale_sets
        self._extensions.clear()
        return entry


def _read_manifest(path: Path) -> BankManifest:
    if not path.parent.is_dir():
        raise BankError(path.parent, "not a directory")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BankError(path, "missing file (not a bank directory?)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as bad:
        raise BankError(path, f"bad JSON: {bad}") from None
    return BankManifest.from_json(data, path)


def _check_model(model: dict[str, Any], path: Path, config: ModelConfig | None, fingerprint: str | None,
                 quantization: str | None) -> None:
    """Refuses a bank built for another model; the shape fields first, since they give the clearest message."""
    if config is not None:
        for name in ("arch", "n_layer", "d_inner", "d_state", "scale_channels"):
            if model[name] != getattr(config, name):
                raise BankError(path, f"bank is for another model: bank {name} = {model[name]!r}, "
                                      f"model {name} = {getattr(config, name)!r}")
        ours, theirs = model["training_context_length"], config.training_context_length
        if ours is not None and theirs is not None and ours != theirs:
            raise BankError(path, f"bank is for a model trained at {ours} tokens, this one at {theirs}")
    if model["quantization"] != quantization:
        raise BankError(path, f"quantization mismatch: bank calibrated on the {model['quantization'] or 'unquantised'}"
                              f" model, this model is {quantization or 'unquantised'}")
    if fingerprint is not None and model["fingerprint"] != fingerprint:
        raise BankError(path, f"bank is for another model: bank fingerprint {model['fingerprint']}, "
                              f"model fingerprint {fingerprint}")


def _read_scales(path: Path, entry: BankEntry, model: dict[str, Any]) -> ScaleSet:
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise BankError(path, f"missing file (entry {entry.bucket!r})") from None
    try:
        tensors = safetensors.torch.load(blob)
    except SafetensorError as bad:
        raise BankError(path, f"truncated or corrupt safetensors file ({bad})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != entry.sha256:
        raise BankError(path, f"sha256 mismatch: file has {digest}, bank.json records {entry.sha256}")
    return _scale_set(tensors, entry, model, path)


def _scale_set(tensors: dict[str, torch.Tensor], entry: BankEntry, model: dict[str, Any], path: Path) -> ScaleSet:
    """Checks one file's tensors against its entry and the bank's model; returns them as a ScaleSet."""
    expected = [f"layers.{i}" for i in range(model["n_layer"])]
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise BankError(path, f"missing tensor {missing[0]!r} (the model has {model['n_layer']} layers)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BankError(path, f"unexpected tensor {extra[0]!r} (the model has {model['n_layer']} layers)")
    method, layers = ScaleMethod(entry.method), tuple(tensors[key] for key in expected)
    shapes = ScaleShapes(**{name: model[name] for name in ("arch", "n_layer", "scale_channels", "d_inner", "d_state")})
    try:
        check_scales(method, layers, shapes, Granularity(entry.granularity))
    except ScaleSetError as fault:
        raise BankError(path, str(fault)) from None
    return ScaleSet(method, layers)


def _manifest_bytes(manifest: BankManifest) -> bytes:
    return (json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a partial write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""The bank manifest (`bank.json`, docs/ARCHITECTURE.md): which model it belongs to and one record per bucket.

Reading is strict: an unknown or missing field, a wrong type or an inconsistent entry raises BankError
naming the file and the field (`entries[1].method: ...`), so a hand-edited manifest never half-works.
Writing goes through the same checks (`BankManifest.from_json(manifest.to_json(), path)`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from runtime.extension import DECIMATE
from runtime.scales import Granularity, ScaleMethod, granularities_of

from .buckets import parse_length
from .errors import BankError

FORMAT_VERSION = 1
TENSOR_METHODS = tuple(m.value for m in ScaleMethod)  # entries of these hold one scale tensor per layer
METHODS = (*TENSOR_METHODS, DECIMATE)  # a decimate entry holds params
GRANULARITIES = (*(g.value for g in Granularity), "none")  # "none": decimate
CHOICES = ("identity", "previous", "calibrated")  # what a build kept, after comparing on held-out data
RESERVED_NAMES = ("auto", "none")  # values of a request's `scale_bucket`, so never bucket names
ARCHS = ("mamba1", "mamba2")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # also a safe file name: no separators, no leading dot
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")

_STR: tuple[type, ...] = (str,)
_INT: tuple[type, ...] = (int,)
_DICT: tuple[type, ...] = (dict,)
_LIST: tuple[type, ...] = (list,)
_NONE: tuple[type, ...] = (type(None),)
_MODEL_FIELDS = {"fingerprint": _STR, "arch": _STR, "n_layer": _INT, "d_inner": _INT, "d_state": _INT,
                 "scale_channels": _INT, "training_context_length": _INT + _NONE, "quantization": _STR + _NONE}
_DATA_FILE_FIELDS = {"path": _STR, "sha256": _STR, "documents": _LIST}  # documents: the ids used from the file


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class BankEntry:
    """One bucket: what was calibrated, how, on what data, how well, and which result was kept."""

    bucket: str  # name a request uses (`scale_bucket`), e.g. "8k"; the tensors live in "<bucket>.safetensors"
    length: int  # tokens: the context length the entry was calibrated for
    method: str  # one of METHODS
    granularity: str  # a runtime.scales.Granularity's value; decimate: "none"
    version: str  # project version that built the entry
    file: str | None = None  # set by Bank.add_entry; None for methods without tensors (decimate)
    sha256: str | None = None  # of `file`, set by Bank.add_entry
    params: dict = field(default_factory=dict)  # method parameters (decimate: layer, l_base, beta, ...), kept as given
    calibrator: dict = field(default_factory=lambda: {"name": "none"})  # name + hyper-parameters
    seed: int | None = None
    # lists of {path, sha256, documents: [document ids]}; one file may feed both parts, never one document
    data: dict = field(default_factory=lambda: {"calibration": [], "held_out": []})
    # {"identity"|"previous"|"calibrated": {metric: number}} on held-out data
    metrics: dict[str, Any] = field(default_factory=dict)
    chosen: str = "calibrated"  # which of CHOICES the entry serves; "identity" means no scales are applied
    created: str = field(default_factory=_now)  # ISO 8601

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, path, where: str = "entry") -> BankEntry:
        spec = {"bucket": _STR, "length": _INT, "method": _STR, "granularity": _STR, "version": _STR,
                "file": _STR + _NONE, "sha256": _STR + _NONE, "params": _DICT, "calibrator": _DICT,
                "seed": _INT + _NONE, "data": _DICT, "metrics": _DICT, "chosen": _STR, "created": _STR}
        _check_fields(data, spec, path, where)
        entry = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        entry._check(path, where)
        return entry

    def _check(self, path, where: str) -> None:
        def fault(name: str, message: str) -> BankError:
            return BankError(path, f"{where}.{name}: {message}")

        if not _NAME.match(self.bucket) or self.bucket in RESERVED_NAMES:
            raise fault("bucket", f"bad bucket name {self.bucket!r} (letters, digits, '.', '_', '-'; "
                                  f"not {' or '.join(RESERVED_NAMES)})")
        if self.length <= 0:
            raise fault("length", f"must be a positive number of tokens, got {self.length}")
        try:
            named = parse_length(self.bucket)
        except ValueError:
            named = None  # a free-form name ("8k-passkey") says no length
        if named is not None and named != self.length:
            raise fault("length", f"{self.length} tokens, but bucket {self.bucket!r} names {named}")
        if self.method not in METHODS:
            raise fault("method", f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if self.granularity not in GRANULARITIES:
            raise fault("granularity", f"unknown granularity {self.granularity!r} (known: {', '.join(GRANULARITIES)})")
        if (self.method in TENSOR_METHODS) == (self.granularity == "none"):
            raise fault("granularity", f"{self.granularity!r} does not go with method {self.method!r}")
        if self.granularity == "channel_state" and self.method != "a_spectrum":
            raise fault("granularity", "channel_state scales exist only for method 'a_spectrum'")
        if self.method in TENSOR_METHODS:
            if self.file != f"{self.bucket}.safetensors":
                raise fault("file", f"expected {self.bucket + '.safetensors'!r}, got {self.file!r}")
            if self.sha256 is None or not _SHA256.match(self.sha256):
                raise fault("sha256", f"expected 64 lower-case hex digits, got {self.sha256!r}")
        elif self.file is not None or self.sha256 is not None:
            raise fault("file", f"method {self.method!r} stores no tensors, so file and sha256 must be null")
        if not isinstance(self.calibrator.get("name"), str):
            raise fault("calibrator", "needs a string 'name'")
        if not self.version:
            raise fault("version", "must name the project version")
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise fault("created", f"not an ISO 8601 time: {self.created!r}") from None
        if self.chosen not in CHOICES:
            raise fault("chosen", f"unknown choice {self.chosen!r} (known: {', '.join(CHOICES)})")
        _check_data(self.data, path, f"{where}.data")
        _check_metrics(self.metrics, self.chosen, path, f"{where}.metrics")


@dataclass(frozen=True)
class BankManifest:
    """`bank.json`: the model the bank belongs to and its entries, shortest bucket first."""

    model: dict  # fingerprint, arch, n_layer, d_inner, d_state, scale_channels, training_context_length, quantization
    entries: tuple[BankEntry, ...] = ()  # sorted by length; bucket names and lengths unique
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "model": dict(self.model),
                "entries": [entry.to_json() for entry in self.entries]}

    @classmethod
    def from_json(cls, data: Any, path) -> BankManifest:
        _check_fields(data, {"format_version": _INT, "model": _DICT, "entries": _LIST}, path, "manifest")
        if data["format_version"] != FORMAT_VERSION:
            raise BankError(path, f"format_version: unsupported version {data['format_version']} "
                                  f"(this build reads {FORMAT_VERSION})")
        model = data["model"]
        _check_model(model, path)
        entries = [BankEntry.from_json(e, path, f"entries[{i}]") for i, e in enumerate(data["entries"])]
        for key in ("bucket", "length"):
            seen = set()
            for i, entry in enumerate(entries):
                value = getattr(entry, key)
                if value in seen:
                    raise BankError(path, f"entries[{i}].{key}: duplicate {key} {value!r}")
                seen.add(value)
        for i, entry in enumerate(entries):
            if entry.granularity != "none" and Granularity(entry.granularity) not in granularities_of(model["arch"]):
                raise BankError(path, f"entries[{i}].granularity: {entry.granularity!r} does not exist "
                                      f"for a {model['arch']} model")
        return cls(dict(model), tuple(sorted(entries, key=lambda e: e.length)), data["format_version"])


def _check_fields(data: Any, spec: dict[str, tuple[type, ...]], path, where: str) -> None:
    """Exactly the fields of `spec`, each of one of its types (a bool is not an int here)."""
    if not isinstance(data, dict):
        raise BankError(path, f"{where}: expected an object, got {type(data).__name__}")
    missing = [name for name in spec if name not in data]
    if missing:
        raise BankError(path, f"{where}.{missing[0]}: missing field")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise BankError(path, f"{where}.{unknown[0]}: unknown field")
    for name, types in spec.items():
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise BankError(path, f"{where}.{name}: expected {expected}, got {type(value).__name__} {value!r}")


def _check_model(model: dict, path) -> None:
    _check_fields(model, _MODEL_FIELDS, path, "model")
    if model["arch"] not in ARCHS:
        raise BankError(path, f"model.arch: unknown arch {model['arch']!r} (known: {', '.join(ARCHS)})")
    if not model["fingerprint"]:
        raise BankError(path, "model.fingerprint: empty")
    for name in ("n_layer", "d_inner", "d_state", "scale_channels", "training_context_length"):
        if model[name] is not None and model[name] <= 0:
            raise BankError(path, f"model.{name}: must be positive, got {model[name]}")


def _check_data(data: dict, path, where: str) -> None:
    """Calibration and held-out files, each {path, sha256, documents}; the two parts share no document."""
    _check_fields(data, {"calibration": _LIST, "held_out": _LIST}, path, where)
    for part in ("calibration", "held_out"):
        for i, item in enumerate(data[part]):
            _check_fields(item, _DATA_FILE_FIELDS, path, f"{where}.{part}[{i}]")
            if not all(isinstance(doc, str) for doc in item["documents"]):
                raise BankError(path, f"{where}.{part}[{i}].documents: expected a list of document ids (strings)")
    for i, item in enumerate(data["held_out"]):
        for other in data["calibration"]:
            same_file = item["path"] == other["path"] or item["sha256"] == other["sha256"]
            shared = set(item["documents"]) & set(other["documents"]) if same_file else set()
            if shared:
                raise BankError(path, f"{where}.held_out[{i}]: {item['path']!r} shares documents with the calibration "
                                      f"data ({', '.join(sorted(shared)[:3])})")


def _check_metrics(metrics: dict, chosen: str, path, where: str) -> None:
    """{"identity"|"previous"|"calibrated": {metric name: finite number}}; the chosen one among them."""
    for group, values in metrics.items():
        if group not in CHOICES:
            raise BankError(path, f"{where}.{group}: unknown group (known: {', '.join(CHOICES)})")
        if not isinstance(values, dict):
            raise BankError(path, f"{where}.{group}: expected an object, got {type(values).__name__}")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BankError(path, f"{where}.{group}.{name}: expected a finite number, got {value!r}")
    if metrics and chosen not in metrics:
        raise BankError(path, f"{where}: chosen is {chosen!r} but there are no {chosen!r} metrics")

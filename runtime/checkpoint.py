"""Reading checkpoint directories into canonical tensors.

Canonical names are those of `runtime.model.MambaLM.state_dict()`:
`embedding.weight`, `layers.{i}.norm.weight`, `layers.{i}.mixer.<param>`, `norm_f.weight`, `lm_head.weight`.
The `mamba_ssm` layout prefixes them with `backbone.` and the Hugging Face layout also spells the
embedding `embeddings`; mixer parameter names are the same in both layouts.

Every fault is a `CheckpointError` naming the file; nothing is ever loaded partially.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ModelConfig, parse_config
from .errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    layout: str  # "mamba_ssm" or "hf"
    tensors: dict[str, torch.Tensor]  # canonical name -> tensor, as stored (dtype unchanged)
    weight_files: list[Path]
    quantization: str | None = None  # "int8", "int6" (+ "+embedding"): a checkpoint saved quantised


def _quantization(raw: dict[str, Any], path: Path) -> str | None:
    """config.json's "quantization": {"scheme": "int8"|"int6", "embedding": bool}, as "int8[+embedding]"."""
    record = raw.get("quantization")
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("scheme") not in ("int8", "int6") or not isinstance(
            record.get("embedding", False), bool):
        raise CheckpointError(path, f"bad quantization record {record!r} "
                                    "(expected scheme int8 or int6, embedding bool)")
    scheme: str = record["scheme"]
    return scheme + ("+embedding" if record.get("embedding") else "")


def read_config(directory: Path) -> tuple[ModelConfig, str, str | None]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(directory, "not a directory")
    if not path.is_file():
        raise CheckpointError(path, "missing file (a checkpoint directory needs config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise CheckpointError(path, f"not valid JSON: {bad}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(path, "not a JSON object")
    return (*parse_config(raw, path), _quantization(raw, path))


def _weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as bad:
            raise CheckpointError(path, f"bad shard index: {bad!r}") from None
        shards = [directory / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(shard, f"missing file (listed in {path.name})")
        return shards
    raise CheckpointError(directory, f"missing weights: none of {', '.join(WEIGHT_FILES)}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as bad:
            raise CheckpointError(path, f"unreadable safetensors file (truncated or corrupt): {bad}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as bad:
        raise CheckpointError(path, f"unreadable .bin file (truncated, corrupt or not weights-only): {bad}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "not a state dict of tensors")
    return state


def _canonical_name(name: str) -> str:
    name = name.removeprefix("backbone.")
    if name.startswith("embeddings."):
        return "embedding." + name.removeprefix("embeddings.")
    return name


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Reads config and every weight file; renames tensors; checks values are finite."""
    directory = Path(directory)
    config, layout, quantization = read_config(directory)
    files = _weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in _read_tensors(path).items():
            integer = quantization is not None and name.endswith(".qweight")  # quantised values
            if not integer and not torch.is_floating_point(tensor):
                raise CheckpointError(path, f"tensor {name!r} has non-float dtype {tensor.dtype}")
            if not integer and not torch.isfinite(tensor).all():
                raise CheckpointError(path, f"tensor {name!r} holds NaN or Inf values")
            tensors[_canonical_name(name)] = tensor
    return Checkpoint(directory, config, layout, tensors, files, quantization)


def check_against(checkpoint: Checkpoint,
                  expected: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Tensors of `checkpoint` that fill exactly the `expected` names and shapes (and integer dtypes), or a
    CheckpointError."""
    where = checkpoint.weight_files[0] if len(checkpoint.weight_files) == 1 else checkpoint.path
    tensors = dict(checkpoint.tensors)
    if checkpoint.config.tie_embeddings and "lm_head.weight" in tensors and "lm_head.weight" not in expected:
        # mamba_ssm saves the tied head beside the embedding; it must be the same matrix.
        head = tensors.pop("lm_head.weight")
        embedding = tensors.get("embedding.weight")
        if embedding is not None and not torch.equal(head, embedding):
            raise CheckpointError(where, "lm_head.weight differs from the embedding but embeddings are tied")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise CheckpointError(where, f"missing tensors: {', '.join(missing[:8])}{more}")
    if extra:
        raise CheckpointError(where, f"unexpected tensors: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
    for name, (shape, dtype) in expected.items():
        if not dtype.is_floating_point and tensors[name].dtype != dtype:
            raise CheckpointError(where, f"dtype mismatch for {name!r}: file has {tensors[name].dtype}, "
                                         f"expected {dtype}")
        if tensors[name].shape != shape:
            raise CheckpointError(
                where, f"shape mismatch for {name!r}: file has {tuple(tensors[name].shape)}, "
                       f"config implies {tuple(shape)}"
            )
    return tensors

"""Model configuration: one dataclass for Mamba1 and Mamba2, read from either checkpoint layout.

Two layouts are found in the wild:
- `mamba_ssm` (`state-spaces/mamba-130m`, `mamba2-780m`, ...): `d_model`, `n_layer`, `ssm_cfg` ...
- Hugging Face (`MambaForCausalLM`, `Mamba2ForCausalLM`): `hidden_size`, `num_hidden_layers`, `state_size` ...
Both are mapped onto `ModelConfig`; fields that are derived (`d_inner`, `nheads`, padded vocabulary) are
computed once in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MAMBA1 = "mamba1"
MAMBA2 = "mamba2"


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # MAMBA1 or MAMBA2
    d_model: int
    n_layer: int
    vocab_size: int  # rows of the embedding, already padded
    d_state: int = 16  # n: state size per channel (Mamba1) or per head (Mamba2)
    d_conv: int = 4  # width of the causal depth-wise convolution
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # Mamba1: rank of the Δ projection; 0 means ceil(d_model / 16)
    headdim: int = 64  # Mamba2: p, channels per head
    ngroups: int = 1  # Mamba2: g, groups sharing B and C
    chunk_size: int = 256  # Mamba2: chunk length of the SSD kernel
    dt_limit: tuple[float, float] = (0.0, math.inf)  # Mamba2: Δ is clamped to this range before any scale
    norm_eps: float = 1e-5
    rms_norm: bool = True  # False: LayerNorm with bias (some mamba_ssm checkpoints)
    residual_in_fp32: bool = True  # keeps the residual stream in float32 whatever the model dtype
    tie_embeddings: bool = True
    proj_bias: bool = False  # bias on in_proj and out_proj
    conv_bias: bool = True
    # Length the weights were trained at, when the checkpoint says so (our own models do); the bank's
    # selection policy uses no scales at or below it.
    training_context_length: int | None = None
    d_inner: int = field(init=False)
    nheads: int = field(init=False)  # Mamba2 only; 0 for Mamba1

    def __post_init__(self) -> None:
        assert self.arch in (MAMBA1, MAMBA2), f"unknown arch {self.arch!r}"
        object.__setattr__(self, "d_inner", self.expand * self.d_model)
        if self.arch == MAMBA1 and self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        nheads = self.d_inner // self.headdim if self.arch == MAMBA2 else 0
        object.__setattr__(self, "nheads", nheads)
        if self.arch == MAMBA2:
            assert self.d_inner % self.headdim == 0, "d_inner must be a multiple of headdim"
            assert nheads % self.ngroups == 0, "nheads must be a multiple of ngroups"

    @property
    def conv_dim(self) -> int:
        """Channels through the convolution: x (Mamba1); x, B and C (Mamba2)."""
        if self.arch == MAMBA1:
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def scale_channels(self) -> int:
        """Entries of a per-channel (Mamba1: d_inner) or per-head (Mamba2: nheads) scale vector."""
        return self.d_inner if self.arch == MAMBA1 else self.nheads

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        data["dt_limit"] = [self.dt_limit[0], None if math.isinf(self.dt_limit[1]) else self.dt_limit[1]]
        return data


def _padded(vocab_size: int, multiple: int) -> int:
    return vocab_size if multiple <= 1 else multiple * math.ceil(vocab_size / multiple)


_REQUIRED = object()  # a field without a default


class _Fields:
    """One JSON object of config.json, each field read with its type checked: a wrong one is a CheckpointError
    naming the file and the field (nested ones as `ssm_cfg.d_state`), not a crash later in the model's code."""

    def __init__(self, raw: dict[str, Any], path: Path, prefix: str = ""):
        self.raw, self.path, self.prefix = raw, path, prefix

    def has(self, key: str) -> bool:
        return key in self.raw

    def _value(self, key: str, default: Any) -> Any:
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            raise CheckpointError(self.path, f"missing field {self.prefix + key!r}")
        return default

    def _wrong(self, key: str, expected: str) -> CheckpointError:
        return CheckpointError(self.path, f"field {self.prefix + key!r} must be {expected}, got {self.raw[key]!r}")

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1, auto: bool = False) -> Any:
        """An int ≥ `minimum` (JSON true is not 1); with `auto`, the string "auto" too, returned as 0."""
        value = self._value(key, default)
        if key not in self.raw:
            return value
        if auto and value == "auto":
            return 0
        if type(value) is not int or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
            raise self._wrong(key, kind + (' or "auto"' if auto else ""))
        return value

    def optional_integer(self, key: str) -> int | None:
        """A positive int, or absent / null."""
        return None if self.raw.get(key) is None else self.integer(key)

    def number(self, key: str, default: float) -> float:
        """A positive finite number."""
        value = self._value(key, default)
        if key in self.raw and (type(value) not in (int, float) or not 0 < value < math.inf):
            raise self._wrong(key, "a positive number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key, default)
        if type(value) is not bool:
            raise self._wrong(key, "true or false")
        return value

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._value(key, default)
        if key in self.raw and not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def limits(self, key: str) -> tuple[float, float]:
        """Mamba2's Δ range: two numbers, the upper one null, Infinity or transformers 5's {"__float__": "Infinity"}
        for no limit; absent: (0, no limit)."""
        value = self._value(key, [0.0, None])
        try:
            lo, hi = [math.inf if v is None else float(v["__float__"] if isinstance(v, dict) else v) for v in value]
        except (TypeError, ValueError, KeyError):
            raise self._wrong(key, "a list of two numbers (null: no limit)") from None
        return lo, hi

    def nested(self, key: str) -> _Fields:
        """A nested object (absent or null: empty)."""
        value = self.raw.get(key) or {}
        if not isinstance(value, dict):
            raise self._wrong(key, "an object")
        return _Fields(value, self.path, f"{self.prefix}{key}.")


def from_mamba_ssm(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """`mamba_ssm.models.config_mamba.MambaConfig` as saved by `MambaLMHeadModel.save_pretrained`."""
    top = _Fields(cfg, path)
    ssm = top.nested("ssm_cfg")
    layer = ssm.text("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(path, f"unknown architecture: ssm_cfg.layer = {layer!r} (known: Mamba1, Mamba2)")
    if top.integer("d_intermediate", 0, minimum=0):
        raise CheckpointError(path, f"unsupported: d_intermediate = {cfg['d_intermediate']} (MLP blocks)")
    if cfg.get("attn_layer_idx"):
        raise CheckpointError(path, "unsupported: attn_layer_idx is set (hybrid attention layers)")
    for key, supported in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
        if ssm.has(key) and ssm.raw[key] != supported:
            raise CheckpointError(path, f"unsupported: ssm_cfg.{key} = {ssm.raw[key]!r}")
    d_model, expand = top.integer("d_model"), ssm.integer("expand", 2)
    if ssm.raw.get("d_ssm") not in (None, d_model * expand):
        raise CheckpointError(path, f"unsupported: ssm_cfg.d_ssm = {ssm.raw['d_ssm']} (partial SSM width)")
    arch = MAMBA2 if layer == "Mamba2" else MAMBA1
    common = dict(
        d_model=d_model,
        n_layer=top.integer("n_layer"),
        vocab_size=_padded(top.integer("vocab_size"), top.integer("pad_vocab_size_multiple", 8, minimum=0)),
        norm_eps=top.number("norm_epsilon", 1e-5),
        rms_norm=top.flag("rms_norm", True),
        residual_in_fp32=top.flag("residual_in_fp32", True),
        tie_embeddings=top.flag("tie_embeddings", True),
        training_context_length=top.optional_integer("training_context_length"),
        d_conv=ssm.integer("d_conv", 4),
        expand=expand,
        proj_bias=ssm.flag("bias", False),
        conv_bias=ssm.flag("conv_bias", True),
    )
    if arch == MAMBA1:
        return ModelConfig(arch=arch, d_state=ssm.integer("d_state", 16), dt_rank=ssm.integer("dt_rank", 0, auto=True),
                           **common)
    return ModelConfig(
        arch=arch,
        d_state=ssm.integer("d_state", 128),
        headdim=ssm.integer("headdim", 64),
        ngroups=ssm.integer("ngroups", 1),
        chunk_size=ssm.integer("chunk_size", 256),
        dt_limit=ssm.limits("dt_limit"),
        **common,
    )


def from_hugging_face(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """transformers' `MambaConfig` / `Mamba2Config` (`config.json` beside `model.safetensors`)."""
    top = _Fields(cfg, path)
    model_type = cfg.get("model_type")
    if model_type not in ("mamba", "mamba2"):
        raise CheckpointError(path, f"unknown architecture: model_type = {model_type!r} (known: mamba, mamba2)")
    if top.text("hidden_act", "silu") != "silu":
        raise CheckpointError(path, f"unsupported: hidden_act = {cfg['hidden_act']!r} (only silu)")
    common = dict(
        d_model=top.integer("hidden_size"),
        n_layer=top.integer("num_hidden_layers"),
        vocab_size=top.integer("vocab_size"),
        d_conv=top.integer("conv_kernel", 4),
        expand=top.integer("expand", 2),
        norm_eps=top.number("layer_norm_epsilon", 1e-5),
        residual_in_fp32=top.flag("residual_in_fp32", True),
        proj_bias=top.flag("use_bias", False),
        conv_bias=top.flag("use_conv_bias", True),
        training_context_length=top.optional_integer("training_context_length"),
    )
    if model_type == "mamba":
        return ModelConfig(
            arch=MAMBA1,
            d_state=top.integer("state_size", 16),
            dt_rank=top.integer("time_step_rank", 0, auto=True),
            tie_embeddings=top.flag("tie_word_embeddings", True),
            **common,
        )
    config = ModelConfig(
        arch=MAMBA2,
        d_state=top.integer("state_size", 128),
        headdim=top.integer("head_dim", 64),
        ngroups=top.integer("n_groups", 1),
        chunk_size=top.integer("chunk_size", 256),
        dt_limit=top.limits("time_step_limit"),
        tie_embeddings=top.flag("tie_word_embeddings", False),
        **common,
    )
    if top.has("num_heads") and top.integer("num_heads") != config.nheads:
        raise CheckpointError(
            path, f"num_heads = {cfg['num_heads']} but hidden_size * expand / head_dim = {config.nheads}"
        )
    return config


def parse_config(cfg: dict[str, Any], path: Path) -> tuple[ModelConfig, str]:
    """Returns the config and the layout name (`mamba_ssm` or `hf`) that the tensor names follow."""
    try:
        if "model_type" in cfg:
            return from_hugging_face(cfg, path), "hf"
        if "d_model" in cfg:
            return from_mamba_ssm(cfg, path), "mamba_ssm"
    except AssertionError as bad:  # ModelConfig's checks of fields against each other
        raise CheckpointError(path, f"bad value: {bad}") from None
    raise CheckpointError(path, "unknown architecture: neither 'model_type' (Hugging Face) nor 'd_model' (mamba_ssm)")

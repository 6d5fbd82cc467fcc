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

    def __post_init__(self):
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


def _number(value) -> float:
    """A float from JSON: plain, null (no limit), or transformers 5's {"__float__": "Infinity"}."""
    if value is None:
        return math.inf
    if isinstance(value, dict):
        value = value["__float__"]
    return float(value)


def _dt_limit(value) -> tuple[float, float]:
    lo, hi = value
    return _number(lo), _number(hi)


def from_mamba_ssm(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """`mamba_ssm.models.config_mamba.MambaConfig` as saved by `MambaLMHeadModel.save_pretrained`."""
    ssm = dict(cfg.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise CheckpointError(path, f"unknown architecture: ssm_cfg.layer = {layer!r} (known: Mamba1, Mamba2)")
    if cfg.get("d_intermediate", 0):
        raise CheckpointError(path, f"unsupported: d_intermediate = {cfg['d_intermediate']} (MLP blocks)")
    if cfg.get("attn_layer_idx"):
        raise CheckpointError(path, "unsupported: attn_layer_idx is set (hybrid attention layers)")
    for key, supported in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
        if key in ssm and ssm[key] != supported:
            raise CheckpointError(path, f"unsupported: ssm_cfg.{key} = {ssm[key]!r}")
    if ssm.get("d_ssm") not in (None, cfg["d_model"] * ssm.get("expand", 2)):
        raise CheckpointError(path, f"unsupported: ssm_cfg.d_ssm = {ssm['d_ssm']} (partial SSM width)")
    arch = MAMBA2 if layer == "Mamba2" else MAMBA1
    common = dict(
        d_model=cfg["d_model"],
        n_layer=cfg["n_layer"],
        vocab_size=_padded(cfg["vocab_size"], cfg.get("pad_vocab_size_multiple", 8)),
        norm_eps=cfg.get("norm_epsilon", 1e-5),
        rms_norm=cfg.get("rms_norm", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        tie_embeddings=cfg.get("tie_embeddings", True),
        training_context_length=cfg.get("training_context_length"),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        proj_bias=ssm.get("bias", False),
        conv_bias=ssm.get("conv_bias", True),
    )
    if arch == MAMBA1:
        rank = ssm.get("dt_rank", "auto")
        return ModelConfig(arch=arch, d_state=ssm.get("d_state", 16), dt_rank=0 if rank == "auto" else rank, **common)
    return ModelConfig(
        arch=arch,
        d_state=ssm.get("d_state", 128),
        headdim=ssm.get("headdim", 64),
        ngroups=ssm.get("ngroups", 1),
        chunk_size=ssm.get("chunk_size", 256),
        dt_limit=_dt_limit(ssm.get("dt_limit", (0.0, None))),
        **common,
    )


def from_hugging_face(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """transformers' `MambaConfig` / `Mamba2Config` (`config.json` beside `model.safetensors`)."""
    model_type = cfg.get("model_type")
    if model_type not in ("mamba", "mamba2"):
        raise CheckpointError(path, f"unknown architecture: model_type = {model_type!r} (known: mamba, mamba2)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(path, f"unsupported: hidden_act = {cfg['hidden_act']!r} (only silu)")
    rank = cfg.get("time_step_rank", "auto")
    common = dict(
        d_model=cfg["hidden_size"],
        n_layer=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"],
        d_conv=cfg.get("conv_kernel", 4),
        expand=cfg.get("expand", 2),
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        proj_bias=cfg.get("use_bias", False),
        conv_bias=cfg.get("use_conv_bias", True),
        training_context_length=cfg.get("training_context_length"),
    )
    if model_type == "mamba":
        return ModelConfig(
            arch=MAMBA1,
            d_state=cfg.get("state_size", 16),
            dt_rank=0 if rank == "auto" else rank,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            **common,
        )
    config = ModelConfig(
        arch=MAMBA2,
        d_state=cfg.get("state_size", 128),
        headdim=cfg.get("head_dim", 64),
        ngroups=cfg.get("n_groups", 1),
        chunk_size=cfg.get("chunk_size", 256),
        dt_limit=_dt_limit(cfg.get("time_step_limit", (0.0, None))),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        **common,
    )
    if "num_heads" in cfg and cfg["num_heads"] != config.nheads:
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
    except KeyError as missing:
        raise CheckpointError(path, f"missing field {missing.args[0]!r}") from None
    except (TypeError, ValueError, AssertionError) as bad:
        raise CheckpointError(path, f"bad value: {bad}") from None
    raise CheckpointError(path, "unknown architecture: neither 'model_type' (Hugging Face) nor 'd_model' (mamba_ssm)")

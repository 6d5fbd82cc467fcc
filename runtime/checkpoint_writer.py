"""Writing a `MambaLM` as a Hugging Face (transformers `MambaForCausalLM`) checkpoint directory: the layout
`runtime.checkpoint` reads as "hf", and transformers loads as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .model import MambaLM


def hf_config(config: ModelConfig, eos_token_id: int | None) -> dict[str, Any]:
    """transformers' MambaConfig fields for `config`, plus `training_context_length`."""
    return {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "vocab_size": config.vocab_size, "state_size": config.d_state,
        "expand": config.expand, "conv_kernel": config.d_conv, "time_step_rank": config.dt_rank,
        "use_bias": config.proj_bias, "use_conv_bias": config.conv_bias, "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id, "training_context_length": config.training_context_length,
    }


def _hf_name(name: str) -> str:
    """transformers' name of the canonical tensor `name` (the embedding is `embeddings` there)."""
    if name.startswith("embedding."):
        name = name.replace("embedding.", "embeddings.", 1)
    return "backbone." + name


def save_hf(model: MambaLM, tokenizer_path: Path | None, eos_token_id: int | None, out: Path) -> None:
    """config.json + model.safetensors (bfloat16, transformers' tensor names) + tokenizer.json (if given)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.config, eos_token_id), indent=1) + "\n")
    tensors = {_hf_name(name): t.detach().to("cpu", torch.bfloat16).contiguous()
               for name, t in model.state_dict().items()}
    save_file(tensors, out / "model.safetensors")
    if tokenizer_path is not None and tokenizer_path.resolve() != (out / "tokenizer.json").resolve():
        shutil.copy(tokenizer_path, out / "tokenizer.json")

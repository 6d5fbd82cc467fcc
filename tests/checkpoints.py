"""Tiny random checkpoints written by transformers, in both layouts, for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

VOCAB = 96
# the embedded model's tokenizer (byte-level BPE, digits one per token): a real one for tests of text handling
EMBEDDED_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "mamba-extend-default" / "tokenizer.json"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere, so no parameter (A, D, norms, biases) sits at a default that hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            elif name.endswith(("dt_proj.bias", "dt_bias")):
                p.copy_(noise * 0.5 - 2.0)
            elif name.endswith(("norm.weight", "norm_f.weight", ".D")) or name == "D":
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(noise * 0.3 / max(1, p.shape[-1]) ** 0.5 * 3)


def hf_mamba1(directory: Path, seed: int = 0, **overrides) -> MambaForCausalLM:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
               time_step_rank=4, tie_word_embeddings=True, use_mambapy=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = MambaForCausalLM(MambaConfig(**cfg)).eval()
    _perturb(model, seed)
    model.save_pretrained(directory)
    return model


def hf_mamba2(directory: Path, seed: int = 0, **overrides) -> Mamba2ForCausalLM:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, state_size=16, num_hidden_layers=3, expand=2, conv_kernel=4,
               head_dim=8, num_heads=8, n_groups=2, chunk_size=16, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**cfg)).eval()
    _perturb(model, seed)
    model.save_pretrained(directory)
    return model


def to_mamba_ssm_layout(hf_dir: Path, out_dir: Path) -> Path:
    """The same weights as `state-spaces/*` ship them: mamba_ssm config.json + pytorch_model.bin."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(hf_dir / "model.safetensors")
    state = {}
    for name, t in tensors.items():
        state[name.replace("backbone.embeddings.", "backbone.embedding.")] = t
    if cfg.get("tie_word_embeddings", True):
        state["lm_head.weight"] = state["backbone.embedding.weight"]  # mamba_ssm saves the tied head too
    if cfg["model_type"] == "mamba":
        ssm_cfg = {"d_state": cfg["state_size"], "d_conv": cfg["conv_kernel"], "expand": cfg["expand"],
                   "dt_rank": cfg["time_step_rank"]}
    else:
        ssm_cfg = {"layer": "Mamba2", "d_state": cfg["state_size"], "d_conv": cfg["conv_kernel"],
                   "expand": cfg["expand"], "headdim": cfg["head_dim"], "ngroups": cfg["n_groups"],
                   "chunk_size": cfg["chunk_size"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({
        "d_model": cfg["hidden_size"], "n_layer": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"],
        "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": cfg.get("tie_word_embeddings", True),
    }))
    torch.save({k: v.clone() for k, v in state.items()}, out_dir / "pytorch_model.bin")
    return out_dir


def save_safetensors_copy(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """`src`'s config with `tensors` (default: src's own) as model.safetensors in `dst`."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors if tensors is not None else load_file(src / "model.safetensors"), dst / "model.safetensors")
    return dst


# A few sentences that tests cut into "books" for calibration and evaluation data.
BOOK_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The pass key is 12345. Remember it. 67890 is the pass key. What is the pass key? "
    "It was a bright cold day in April, and the clocks were striking thirteen. "
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse. "
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()\n"
)


def tiny_tokenizer(path: Path) -> Path:
    """A real tokenizer.json whose vocabulary fits the tiny models (see tokenizers_for_tests)."""
    from tokenizers_for_tests import train_tokenizer

    return train_tokenizer(path, VOCAB)

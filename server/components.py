"""What the server loads once at start: model, tokenizer, bank. Any fault stops the start with its message."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime import LoadedModel, ScaleMethod, load_model
from runtime.tokenizer import Tokenizer, find_tokenizer
from scale_bank import Bank

from .config import ConfigError, ModelSpec

log = logging.getLogger(__name__)
APPLICABLE_METHODS = {m.value for m in ScaleMethod}  # bank methods the runtime applies; others serve as identity


@dataclass(frozen=True)
class Components:
    loaded: LoadedModel
    tokenizer: Tokenizer
    bank: Bank | None
    training_length: int | None  # bucket selection uses no scales at or below it; None: unknown


def load_components(spec: ModelSpec) -> Components:
    """Raises ConfigError, the runtime's CheckpointError/TokenizerError/BackendUnavailableError or BankError."""
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec.device}: CUDA is not available on this machine")
    loaded = load_model(spec.path, spec.device, spec.dtype, spec.backend, spec.quantize, spec.quantize_embedding)
    tokenizer = find_tokenizer(spec.path, spec.tokenizer)
    if tokenizer.vocab_size > loaded.config.vocab_size:
        raise ConfigError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                          f"({loaded.config.vocab_size}): wrong tokenizer for {loaded.path}")
    bank = None
    if spec.bank is not None:
        bank = Bank.load(spec.bank, config=loaded.config, fingerprint=loaded.fingerprint,
                         quantization=loaded.quantization)
        for entry in bank.manifest.entries:
            if entry.method not in APPLICABLE_METHODS:
                log.warning("bank %s: bucket %s uses method %r, which the runtime cannot apply yet; requests "
                            "choosing it are served without scales", bank.path, entry.bucket, entry.method)
        log.info("bank %s: buckets %s", bank.path, ", ".join(bank.buckets) or "(none)")
    training_length = spec.training_length or loaded.config.training_context_length
    if training_length is None and bank is not None:
        training_length = bank.manifest.model["training_context_length"]
    return Components(loaded, tokenizer, bank, training_length)

"""What the server loads once at start: model, tokenizer, bank. Any fault stops the start with its message."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime import Decimation, DecimationError, LoadedModel, load_model
from runtime.tokenizer import Tokenizer, find_tokenizer
from scale_bank import Bank, BankError

from .chat_template import TokenizerConfig
from .config import ConfigError, ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Components:
    loaded: LoadedModel
    tokenizer: Tokenizer
    bank: Bank | None
    training_length: int | None  # bucket selection uses no scales at or below it; None: unknown
    decimations: dict[str, Decimation]  # bucket → the decimation of each of the bank's decimate entries
    tokenizer_config: TokenizerConfig  # special token strings and the chat template


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
        log.info("bank %s: buckets %s", bank.path, ", ".join(bank.buckets) or "(none)")
    training_length = spec.training_length or loaded.config.training_context_length
    if training_length is None and bank is not None:
        training_length = bank.manifest.model["training_context_length"]
    return Components(loaded, tokenizer, bank, training_length,
                      _decimations(bank, loaded.config.n_layer, training_length),
                      TokenizerConfig.load(spec.path, tokenizer, spec.chat_template))


def _decimations(bank: Bank | None, n_layer: int, training_length: int | None) -> dict[str, Decimation]:
    """The bank's decimate entries, each checked against the model now so that a bad one stops the start;
    `l_base` defaults to the training length."""
    out: dict[str, Decimation] = {}
    if bank is None:
        return out
    for entry in bank.manifest.entries:
        if entry.method == "decimate":
            try:
                out[entry.bucket] = Decimation.from_params(entry.params, n_layer, training_length)
            except DecimationError as bad:
                raise BankError(bank.path / "bank.json", f"bucket {entry.bucket}: {bad}") from None
    return out

"""What the server loads once at start: the model (in the engine process), the tokenizer and the bank (in both
processes). Any fault stops the start with its message."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runtime import Extension, LoadedModel, load_model
from runtime.tokenizer import Tokenizer, find_tokenizer
from scale_bank import Bank

from .chat_template import TokenizerConfig
from .config import ConfigError, ModelSpec
from .engine_protocol import ModelInfo
from .generation_defaults import GenerationDefaults, load_generation_defaults

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Components:
    model: ModelInfo  # the model the engine process loaded
    tokenizer: Tokenizer
    bank: Bank | None
    training_length: int | None  # bucket selection uses no scales at or below it; None: unknown
    tokenizer_config: TokenizerConfig  # special token strings and the chat template
    extensions: dict[str, Extension]  # what each bucket of the bank applies, by name (the engine's model runner's)
    generation: GenerationDefaults  # what requests that leave fields out get


def load_served_model(spec: ModelSpec) -> LoadedModel:
    """The model, on its device. Raises ConfigError, or the runtime's CheckpointError/BackendUnavailableError."""
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec.device}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {spec.device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          "(with --data-parallel-size N, engine i runs on the i-th device after --device's)")
    return load_model(spec.path, spec.device, spec.dtype, spec.backend, spec.quantize, spec.quantize_embedding)


def model_info(loaded: LoadedModel) -> ModelInfo:
    return ModelInfo(loaded.path, loaded.config, loaded.fingerprint, loaded.quantization)


def load_components(spec: ModelSpec, model: ModelInfo) -> Components:
    """The tokenizer and bank of `model` (loaded from `spec`). Raises ConfigError, the runtime's TokenizerError
    or BankError."""
    tokenizer = find_tokenizer(spec.path, spec.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                          f"({model.config.vocab_size}): wrong tokenizer for {model.path}")
    bank = None
    if spec.bank is not None:
        bank = Bank.load(spec.bank, config=model.config, fingerprint=model.fingerprint,
                         quantization=model.quantization)
        log.info("bank %s: buckets %s", bank.path, ", ".join(bank.buckets) or "(none)")
    training_length = spec.training_length or model.config.training_context_length
    if training_length is None and bank is not None:
        training_length = bank.manifest.model["training_context_length"]
    # made once here: a decimate entry that does not fit the model stops the start
    extensions = {} if bank is None else {bucket: bank.extension(bucket, training_length) for bucket in bank.buckets}
    generation = load_generation_defaults(spec.path, spec.generation_config, spec.override_generation_config,
                                          tokenizer.eos_token_id, tokenizer.vocab_size)
    return Components(model, tokenizer, bank, training_length,
                      TokenizerConfig.load(spec.path, tokenizer, spec.chat_template), extensions, generation)

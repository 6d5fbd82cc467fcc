"""The defaults a model's generation config gives its requests, as vLLM takes them (`--generation-config`,
`--override-generation-config`): sampling fields a request leaves out, the length of a chat turn, and the
config's end-of-turn tokens, which end a completion as stop tokens do."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .config import ConfigError
from .protocol import SamplingFields

log = logging.getLogger(__name__)

FILENAME = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # those vLLM takes from it


@dataclass(frozen=True)
class GenerationDefaults:
    sampling: dict[str, float | int] = field(default_factory=dict)  # SAMPLING_FIELDS name → a left-out field's value
    max_tokens: int | None = None  # max_new_tokens: a chat turn's or response's length when the request gives none
    max_tokens_cap: int | None = None  # no request generates more (max_new_tokens of a chosen folder or the override)
    stop_token_ids: tuple[int, ...] = ()  # eos_token_id besides the tokenizer's end of text: stop tokens too


def load_generation_defaults(model_dir: Path, source: str, override: dict[str, Any],
                             eos_token_id: int | None, vocab_size: int) -> GenerationDefaults:
    """`source`: "auto" (the model directory's generation_config.json, if it has one), "vllm" (no sampling
    defaults: vLLM's neutral ones) or a directory holding a generation_config.json. `override`'s keys replace the
    config's. The end-of-turn tokens come from the model directory's config with "auto" and "vllm", as in vLLM.
    Raises ConfigError naming the file and the key of a value a request could not send."""
    chosen = model_dir if source in ("auto", "vllm") else Path(source)
    path = chosen / FILENAME
    if source not in ("auto", "vllm") and not path.is_file():
        raise ConfigError(f"--generation-config {source}: no {FILENAME} in that directory")
    config = _read(path) if path.is_file() else {}
    values = {**({} if source == "vllm" else config), **override}
    where = f"{path} (with --override-generation-config)" if override else str(path)
    sampling = {name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None}
    max_tokens = values.get("max_new_tokens")
    try:  # the values a request could send, in the same ranges
        SamplingFields.model_validate({**sampling, "max_tokens": max_tokens})
    except ValidationError as bad:
        error = bad.errors()[0]
        name = "max_new_tokens" if error["loc"][0] == "max_tokens" else str(error["loc"][0])
        raise ConfigError(f"{where}: {name} {values.get(name)!r}: {error['msg']}") from None
    defaults = GenerationDefaults(
        sampling, max_tokens,
        # vLLM caps every request only by the max_new_tokens one chose for the server: a folder's, or the override's
        max_tokens if source not in ("auto", "vllm") else override.get("max_new_tokens"),
        _end_of_turn(config.get("eos_token_id"), eos_token_id, vocab_size, path))
    if sampling or max_tokens is not None:
        log.warning("requests that leave them out get the generation config's %s (%s); --generation-config vllm "
                    "serves without them", ", ".join(f"{k} {v}" for k, v in {**sampling, "max_new_tokens": max_tokens}
                                                    .items() if v is not None), where)
    return defaults


def _read(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise ConfigError(f"{path}: not a readable JSON file ({bad})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a generation config is a JSON object, got {type(config).__name__}")
    return config


def _end_of_turn(ids: Any, eos_token_id: int | None, vocab_size: int, path: Path) -> tuple[int, ...]:
    """The config's eos_token_id (one id or a list) less the tokenizer's own end of text."""
    listed = [] if ids is None else [ids] if type(ids) is int else ids
    if not isinstance(listed, list) or not all(type(i) is int and 0 <= i < vocab_size for i in listed):
        raise ConfigError(f"{path}: eos_token_id {ids!r}: token ids of the vocabulary (0 … {vocab_size - 1}) expected")
    return tuple(dict.fromkeys(i for i in listed if i != eos_token_id))

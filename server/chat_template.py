"""The model's chat template and special-token strings, from `tokenizer_config.json` beside the model (as
transformers keeps them) or a template file given with --chat-template.

Templates render as transformers renders them: jinja2 in an immutable sandbox with trim_blocks and lstrip_blocks,
the `raise_exception` and `strftime_now` functions and a `tojson` filter that keeps non-ASCII text, with
`messages`, `add_generation_prompt` and the special tokens as variables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.tokenizer import Tokenizer

from .config import ConfigError

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TemplateRenderError(Exception):
    """The template refused the messages (raise_exception) or failed on them."""


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, origin: str):
        """Raises jinja2.TemplateSyntaxError."""
        self.source = source
        self.origin = origin  # where it came from, for messages
        self._compiled = _environment().from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        """Raises TemplateRenderError."""
        try:
            return self._compiled.render(**variables, messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateRenderError:
            raise
        except jinja2.TemplateError as bad:
            raise TemplateRenderError(f"{type(bad).__name__}: {bad}") from None


@dataclass(frozen=True)
class TokenizerConfig:
    """The special tokens' strings (those `tokenizer_config.json` names, else the end-of-text token of
    tokenizer.json) and the chat template (--chat-template, else the config's, else none)."""

    special_tokens: dict[str, str | None]
    chat_template: ChatTemplate | None

    @classmethod
    def load(cls, model_dir: Path, tokenizer: Tokenizer, template_file: Path | None) -> TokenizerConfig:
        """Raises ConfigError on an unreadable config or template, or a template that does not parse."""
        path = Path(model_dir) / TOKENIZER_CONFIG
        config = {}
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as bad:
                raise ConfigError(f"{path}: not readable as JSON ({bad})") from None
        eos = None if tokenizer.eos_token_id is None else tokenizer.id_to_token(tokenizer.eos_token_id)
        special = {name: _token_string(config.get(name)) for name in SPECIAL_TOKENS}
        special["eos_token"] = special["eos_token"] or eos
        source: str | None
        if template_file is not None:
            try:
                source, origin = Path(template_file).read_text(), str(template_file)
            except OSError as bad:
                raise ConfigError(f"--chat-template {template_file}: {bad.strerror or bad}") from None
        else:
            source, origin = _named_default(config.get("chat_template")), str(path)
        try:
            template = None if source is None else ChatTemplate(source, origin)
        except jinja2.TemplateSyntaxError as bad:
            raise ConfigError(f"{origin}: the chat template does not parse (line {bad.lineno}: "
                              f"{bad.message})") from None
        return cls(special, template)


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def _named_default(template) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates of which "default" is used."""
    if isinstance(template, list):
        return next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template

"""Structured output (vLLM's guided decoding): a completion held to a JSON schema, any JSON object, a regular
expression, one of several strings, or an EBNF grammar. xgrammar (the `guided` extra) compiles the constraint
against the tokenizer's vocabulary; each step, a request's grammar state masks the tokens that cannot continue it,
and takes the token chosen. The completion ends when the grammar takes the end of text (also with ignore_eos).

The HTTP side compiles a request's constraint once to refuse a bad one with its field's name; the engine process
compiles it again for the grammar states (compiled grammars are cached by constraint on both sides), on threads of
its own while the request waits in the queue: a constraint can take seconds or minutes to compile (xgrammar
releases the interpreter meanwhile), and the engine thread steps the other requests all the while.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from runtime.tokenizer import Tokenizer

from .errors import InvalidRequestError

INSTALL = "pip install 'mamba-extend-server[guided]' (xgrammar)"
CACHED = 64  # compiled grammars kept per process
COMPILING = 2  # threads that compile constraints at once, in each process: one slow constraint leaves one free
ANY_OBJECT = {"type": "object"}  # the schema of any JSON object: response_format json_object's
XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[00:42:10] /project/cpp/regex_converter.cc:94: "


@dataclass(frozen=True)
class Guide:
    """A request's constraint, as it travels to the engine: `kind` and its text (a JSON schema's JSON, a regular
    expression, the JSON list of choices, an EBNF grammar; empty for any JSON object)."""

    kind: str  # "json_schema", "json_object", "regex", "choice", "grammar"
    spec: str
    field: str  # the request field it came from, named in errors


class Guides:
    """The constraints of one tokenizer's requests: compiled (cached) and turned into grammar states. xgrammar (which
    brings transformers) is imported at the first constraint, or by `preload`, which the engine runs in the
    background at start."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # the HTTP side checks on worker threads, the engine process on compile threads
        self._cache: dict[Guide, Any] = {}  # compiled grammars, the oldest dropped past CACHED
        self._made: Any = None  # the compiler, once made
        self._compiling = threading.BoundedSemaphore(COMPILING)  # held by `compile_soon`'s threads
        self._pending: dict[Guide, concurrent.futures.Future] = {}  # `compile_soon`'s compiles not yet done

    def _compiler(self) -> Any:
        """xgrammar's compiler for this vocabulary, made at the first call (under the lock)."""
        if self._made is None:
            xgrammar = _xgrammar()
            from transformers import PreTrainedTokenizerFast

            vocab = PreTrainedTokenizerFast(tokenizer_file=str(self.tokenizer.path))
            eos = self.tokenizer.eos_token_id
            info = xgrammar.TokenizerInfo.from_huggingface(vocab, vocab_size=self.tokenizer.vocab_size,
                                                           stop_token_ids=None if eos is None else [eos])
            # a quarter of the cores: a long compile leaves the rest to the engine and HTTP threads
            self._made = xgrammar.GrammarCompiler(info, max_threads=max(1, (os.cpu_count() or 1) // 4))
        return self._made

    def _compiled(self, guide: Guide) -> Any:
        """`compile_soon`'s compile of `guide`, cached. Raises InvalidRequestError naming its field when it does not
        compile. The lock is not held while it compiles: one slow constraint holds up no other."""
        with self._lock:
            compiler = self._compiler()
        grammar = self._compile(compiler, guide)
        with self._lock:
            if len(self._cache) >= CACHED:
                del self._cache[next(iter(self._cache))]
            self._cache[guide] = grammar
        return grammar

    def compile_soon(self, guide: Guide) -> concurrent.futures.Future:
        """The future of `guide`'s compiled grammar: done at once when cached, the same future for a constraint already
        compiling (n samples, requests that share a schema), else compiled on a thread of its own, COMPILING at a
        time. Neither the event loop's executor, which tokenises every request, nor a pool, which a process that
        exits would wait for, runs them: slow constraints wait for each other only."""
        with self._lock:
            future = self._pending.get(guide)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            hit = self._cache.get(guide)
            if hit is not None:
                future.set_result(hit)
                return future
            self._pending[guide] = future

        def compile_() -> None:
            with self._compiling:
                try:
                    future.set_result(self._compiled(guide))
                except Exception as bad:
                    future.set_exception(bad)
                finally:
                    with self._lock:
                        del self._pending[guide]

        threading.Thread(target=compile_, name="grammar-compile", daemon=True).start()
        return future

    @staticmethod
    def _compile(compiler: Any, guide: Guide) -> Any:
        try:
            if guide.kind in ("json_object", "json_schema"):
                # whitespace only as json.dumps writes it: a grammar that allows any lets a small model pad for ever
                return compiler.compile_json_schema(guide.spec or json.dumps(ANY_OBJECT), any_whitespace=False)
            if guide.kind == "regex":
                return compiler.compile_regex(guide.spec)
            if guide.kind == "choice":  # one EBNF alternative a choice, each a JSON-escaped string literal
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in json.loads(guide.spec)))
            return compiler.compile_grammar(guide.spec)
        except RuntimeError as bad:  # xgrammar's parse errors, after its log prefix: what and where
            reason = XGRAMMAR_PREFIX.sub("", str(bad).strip().splitlines()[-1]) if str(bad).strip() else repr(bad)
        except UnicodeDecodeError:  # a parse error whose message quotes the text cut inside a character
            reason = "a parse error (its message, which quotes the text, was cut inside a character)"
        raise InvalidRequestError(f"{guide.field}: cannot be compiled as a {guide.kind.replace('_', ' ')}: {reason}",
                                  param=guide.field)

    def preload(self) -> None:
        """Imports xgrammar and reads the vocabulary now (a second or more), where it is installed, so that the
        first guided request does not wait for it."""
        try:
            with self._lock:
                self._compiler()
        except InvalidRequestError:  # not installed: guided requests are refused by the HTTP side
            pass

    @staticmethod
    def state(compiled: Any) -> GuideState:
        """A new state of a compiled grammar (one a sequence: n samples each have their own)."""
        return GuideState(_xgrammar().GrammarMatcher(compiled))


class GuideState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher
        self._bitmask: torch.Tensor | None = None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """scores: (V,) of one sequence. Returns a copy with every token the grammar cannot take next at -inf."""
        xgrammar = _xgrammar()
        if self._bitmask is None:
            self._bitmask = xgrammar.allocate_token_bitmask(1, scores.shape[-1])
        self._matcher.fill_next_token_bitmask(self._bitmask)
        masked = scores.float().cpu().clone()[None]  # (1, V) on the CPU, where the bitmask is
        xgrammar.apply_token_bitmask_inplace(masked, self._bitmask)
        if torch.isneginf(masked).all():
            raise RuntimeError("no token continues the grammar here: no token of the vocabulary spells what it takes "
                               "next, or allowed_token_ids allows none that does")
        return masked[0].to(scores.device, scores.dtype)

    def accept(self, token: int) -> bool:
        """Takes the chosen token; True when the grammar is over (it took the end of text). Raises RuntimeError
        for a token it cannot take (the mask did not hold: an engine fault, which ends the step's requests)."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar cannot take token {token}")
        return bool(self._matcher.is_terminated())


@functools.cache
def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise InvalidRequestError(f"structured output is not installed on this server: {INSTALL}",
                                  code="guided_decoding_unavailable") from None
    return xgrammar

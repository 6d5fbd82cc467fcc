"""The server's settings: one dataclass per concern, built once from the command line by `parse_args`."""

from __future__ import annotations

import argparse
import os
import ssl
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

# The embedded default model and its bank, served when no --model is given (built by extend/, committed).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "mamba-extend-default"
BANK_DIRNAME = "bank"  # a model directory may carry its bank here
API_KEY_VARIABLE = "MAMBA_EXTEND_API_KEY"  # the key when --api-key is not given (the clients read it too)
DEFAULT_MAX_CONTEXT = 131072  # tokens; a recurrent model has no positional limit, so this only bounds work per request
# A prompt of DEFAULT_MAX_CONTEXT tokens is about 0.9 MB as token ids ("12345, " per id) and 0.5-1 MB as English
# or code text; 4 MiB admits either with room for JSON's \u escapes of non-ASCII text, while bounding what one
# request can make the server parse and tokenise (a 4 MiB text prompt takes seconds to tokenise).
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


class ConfigError(Exception):
    """Settings that cannot be served: no model (the default one is not built yet), a tokenizer larger than
    the model's vocabulary, a device this machine lacks, flags that contradict each other."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load at start: everything fails there or not at all."""

    path: Path  # checkpoint directory
    tokenizer: Path | None  # tokenizer.json; None: the one in the checkpoint directory
    bank: Path | None  # bank directory; None: serve without scales
    device: str
    dtype: str | None  # None: the runtime's default for the device
    backend: str  # auto | torch | mamba_ssm
    training_length: int | None  # overrides the checkpoint's; state-spaces checkpoints record none
    quantize: str | None = None  # int8 | int6: quantise the weights as they load (a bank must match it)
    quantize_embedding: bool = False  # the embedding (and an untied LM head) too
    chat_template: Path | None = None  # a jinja2 chat template file; None: tokenizer_config.json's, if any
    # where requests' default sampling fields come from (server.generation_defaults): "auto" (the model
    # directory's generation_config.json), "vllm" (none) or a directory; the override's keys replace its values
    generation_config: str = "auto"
    override_generation_config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loop schedules work."""

    # state slots: sequences that decode together in one batched step; None: sized at start from the device and
    # the model (server.slots), which the engine's own config then holds
    max_batch_size: int | None = None
    max_queue: int = 64  # requests waiting for a slot; one more is refused (429) rather than queued without bound
    # prompt tokens of one request per step: bounds how long a long prompt holds back other streams; None: sized
    # at start from the device (server.slots), which the engine's own config then holds
    prefill_chunk: int | None = None
    # prompt tokens one step prefills, over every request's chunk (vLLM's max_num_batched_tokens); None: sized at
    # start from the device (server.slots), which the engine's own config then holds
    max_prefill_tokens: int | None = None
    request_timeout: float | None = None  # seconds from arrival to the last token; None: no limit
    step_log_size: int = 4096  # engine steps kept in the step log (tests and debugging read it)
    threads: int | None = None  # intra-op threads of the engine thread; None: what torch uses by default
    cuda_graphs: bool = True  # on CUDA, decode through captured graphs (runtime.decode_graph); False: eager
    prefill_graphs: bool = True  # and with them, prefill steps of short chunks (runtime.prefill_graph)
    # launch a decode step before the last one's tokens are taken, so that the host's per-token work (finish rules,
    # detokenising, outputs) runs while the device computes; None: on CUDA (on a CPU the host is the device)
    overlap_decode: bool | None = None
    # decode steps an overlapped launch runs back to back, each from the last one's tokens on the device (vLLM's
    # --num-scheduler-steps): the host's books of a step are paid once for them all, and a request finished by one
    # of them drops the later ones' tokens; None: adapted to whether the device waits on the host (server.multi_step)
    num_scheduler_steps: int | None = None
    # prompt chunks of different lengths share a prefill step, the shorter rows padded (exactly, where the model
    # `pads_exactly`); None: on CUDA, where a step's fixed cost outweighs the pad positions' work (on a CPU the
    # padded work is the step's time)
    prefill_padding: bool | None = None
    # dtype the state slots store SSM states in ("float32", "bfloat16", "float16"); None: the model's dtype, as
    # vLLM's default and mamba_ssm's generate keep them (a bfloat16 GPU model's batch-64 step waits on their traffic)
    ssm_state_dtype: str | None = None
    # prefix caching (server.prefix_cache): rows of stored prompt-prefix states; 0: off, None: as many as slots
    prefix_cache_slots: int | None = 0

    def __post_init__(self) -> None:
        if self.max_prefill_tokens is not None and self.prefill_chunk is not None \
                and self.max_prefill_tokens < self.prefill_chunk:
            raise ConfigError(f"--max-prefill-tokens {self.max_prefill_tokens} is below --prefill-chunk "
                              f"{self.prefill_chunk}: one chunk would not fit in a step; raise the first or lower "
                              "the second")

    @property
    def slots(self) -> int:
        """max_batch_size once sized: the engine's config always has it."""
        assert self.max_batch_size is not None, "sized at start (Engine, server.slots)"
        return self.max_batch_size

    @property
    def prefix_rows(self) -> int:
        """Rows of the prefix cache once the slots are sized (0: no prefix caching)."""
        return self.slots if self.prefix_cache_slots is None else self.prefix_cache_slots

    @property
    def chunk(self) -> int:
        """prefill_chunk once sized: the engine's config always has it."""
        assert self.prefill_chunk is not None, "sized at start (Engine, server.slots)"
        return self.prefill_chunk

    @property
    def prefill_tokens(self) -> int:
        """max_prefill_tokens once sized: the engine's config always has it."""
        assert self.max_prefill_tokens is not None, "sized at start (Engine, server.slots)"
        return self.max_prefill_tokens


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP front."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # bearer token for /v1/*; None: open. /health and /metrics stay open
    served_model_name: str = "mamba"  # the `model` clients name
    max_context: int = DEFAULT_MAX_CONTEXT  # prompt + max_tokens limit per request
    heartbeat: float = 15.0  # seconds between SSE pings on a stream, so proxies keep it open during a long prefill
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a larger request body is refused (413) before it is read
    body_timeout: float = 30.0  # seconds from a request's head to its body's last byte; slower: 408
    header_timeout: float = 10.0  # seconds a connection may take to send a request head, from opening or from
    # its previous response; slower: closed (uvicorn's keep-alive timer stops at the first byte, so a client
    # trickling its head would otherwise hold the connection for ever)
    max_connections: int = 512  # open connections (uvicorn's limit_concurrency): past it, requests get 503
    shutdown_timeout: float = 30.0  # on SIGTERM/SIGINT, seconds running requests get to finish
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from ("*": any); empty: no CORS headers
    ssl_keyfile: Path | None = None  # with ssl_certfile: HTTPS (PEM files); None: plain HTTP
    ssl_certfile: Path | None = None
    access_log: bool = True  # uvicorn's line per HTTP request
    log_requests: bool = False  # the server's lines per completion request: its id, prompts, n, max_tokens; its end


@dataclass(frozen=True)
class ServerConfig:
    model: ModelSpec
    engine: EngineConfig
    http: HttpConfig
    data_parallel_size: int = 1  # engine processes, each with the whole model on a device of its own
    api_server_count: int = 1  # HTTP processes, sharing the listening socket and every engine


def engine_ranks(config: ServerConfig) -> list[ServerConfig]:
    """Each engine process's config (vLLM's data parallelism): engine i on the i-th CUDA device from --device's,
    or on CPU with its share of the cores (unless --threads says how many each takes)."""
    n = config.data_parallel_size
    if n == 1:
        return [config]
    kind, _, index = config.model.device.partition(":")
    if kind == "cuda":
        first = int(index or 0)
        return [replace(config, model=replace(config.model, device=f"cuda:{first + i}")) for i in range(n)]
    if kind != "cpu":
        raise ConfigError(f"--data-parallel-size runs engines on CUDA devices or on the CPU, not on {kind}")
    threads = config.engine.threads or max(1, len(os.sched_getaffinity(0)) // n)
    return [replace(config, engine=replace(config.engine, threads=threads))] * n


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _steps(text: str) -> int | None:
    """--num-scheduler-steps: a positive count, or `auto` (None)."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text}")
    return int(text)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as bad:
        raise argparse.ArgumentTypeError(f"not JSON ({bad}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object expected, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-extend-server", description="OpenAI-compatible server for Mamba "
                                "models with per-request Δ-scale buckets (MambaExtend).")
    p.add_argument("--model", type=Path, help=f"checkpoint directory (default: the embedded {DEFAULT_MODEL_DIR})")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the one in the model directory)")
    p.add_argument("--bank", type=Path, help=f"scale bank directory (default: <model>/{BANK_DIRNAME} if it exists)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--backend", choices=("auto", "torch", "mamba_ssm"), default="auto")
    p.add_argument("--quantize", choices=("int8", "int6"), help="weight-only quantisation of the linear layers")
    p.add_argument("--quantize-embedding", action="store_true", help="with --quantize: the embedding too")
    p.add_argument("--chat-template", type=Path,
                   help="jinja2 chat template for /v1/chat/completions (default: the chat_template of the model "
                        "directory's tokenizer_config.json)")
    p.add_argument("--generation-config", default="auto",
                   help="where requests' default temperature, top_p, top_k, min_p, repetition_penalty and chat "
                        "turn length (max_new_tokens) come from, for the fields a request leaves out: auto (the "
                        "model directory's generation_config.json, if any), vllm (none: neutral sampling), or a "
                        "directory holding a generation_config.json (its max_new_tokens then caps every request)")
    p.add_argument("--override-generation-config", type=_json_object, default={}, metavar="JSON",
                   help="generation config values replacing the chosen one's, e.g. '{\"temperature\": 0.7}' "
                        "(a max_new_tokens here caps every request)")
    p.add_argument("--training-length", type=_positive_int,
                   help="the model's training context length, overriding the checkpoint's (state-spaces "
                        "checkpoints record none; theirs is 2048)")
    p.add_argument("--host", default=HttpConfig.host)
    p.add_argument("--port", type=int, default=HttpConfig.port)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer <key>' on /v1/* (default: ${API_KEY_VARIABLE}, "
                   "which keeps the key out of the process list)")
    p.add_argument("--served-model-name", help="model name in the API (default: the model directory's name)")
    p.add_argument("--max-context", "--max-model-len", type=_positive_int, default=HttpConfig.max_context,
                   help="most tokens (prompt + max_tokens) one request may reach")
    p.add_argument("--heartbeat", type=_positive_float, default=HttpConfig.heartbeat, help="seconds between SSE pings")
    p.add_argument("--max-body-bytes", type=_positive_int, default=HttpConfig.max_body_bytes,
                   help="largest request body; a larger one gets 413 before it is read")
    p.add_argument("--body-timeout", type=_positive_float, default=HttpConfig.body_timeout,
                   help="seconds a request body may take to arrive (408 after)")
    p.add_argument("--header-timeout", type=_positive_float, default=HttpConfig.header_timeout,
                   help="seconds a connection may take to send a request head before it is closed")
    p.add_argument("--max-connections", type=_positive_int, default=HttpConfig.max_connections,
                   help="open connections; past it, requests get 503")
    p.add_argument("--shutdown-timeout", type=_positive_float, default=HttpConfig.shutdown_timeout,
                   help="on SIGTERM/SIGINT, seconds running requests get to finish before they end with an error")
    p.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="no log line per HTTP request (uvicorn's access log; vLLM's flag)")
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log lines per completion request: its id, prompts, n, max_tokens; each choice's end "
                        "(vLLM's flag)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no log line per completion request, the default (vLLM's former flag, kept for its scripts)")
    p.add_argument("--ssl-keyfile", type=Path, help="with --ssl-certfile: serve HTTPS with this PEM private key")
    p.add_argument("--ssl-certfile", type=Path, help="with --ssl-keyfile: the PEM certificate (chain) to present")
    p.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="origins whose browser pages may call the API (CORS), e.g. https://app.example.org, or '*'")
    p.add_argument("--max-batch-size", "--max-num-seqs", type=_positive_int,
                   help="state slots: sequences decoded together (default: 16 on CPU; on CUDA up to 256, as many "
                        "as a tenth of the free device memory holds)")
    p.add_argument("--max-queue", type=_positive_int, default=EngineConfig.max_queue)
    p.add_argument("--prefill-chunk", type=_positive_int,
                   help="prompt tokens of one request per engine step (default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--max-prefill-tokens", "--max-num-batched-tokens", type=_positive_int,
                   help="prompt tokens per engine step over all the requests prefilled together, at least "
                        "--prefill-chunk (default: 2048 on CPU, 16384 on CUDA, or --prefill-chunk if larger)")
    p.add_argument("--request-timeout", type=_positive_float, help="seconds a request may take (default: no limit)")
    p.add_argument("--threads", type=_positive_int,
                   help="CPU threads for the model, of each engine (default: torch's default; with "
                        "--data-parallel-size N, the cores shared out)")
    p.add_argument("--data-parallel-size", "-dp", type=_positive_int, default=1,
                   help="engines, each a process with the whole model on a device of its own (CUDA devices from "
                        "--device's on, or CPU cores); requests go to the least loaded. --max-batch-size and "
                        "--max-queue are per engine")
    p.add_argument("--api-server-count", "-asc", type=_positive_int, default=1,
                   help="HTTP processes, sharing the port and the engines: HTTP, JSON and server-sent events on "
                        "several cores, for many streams at once (--max-connections is per process)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on CUDA, launch each step's kernels one by one instead of replaying CUDA graphs (decode "
                        "steps, and prefill steps of short chunks)")
    p.add_argument("--eager-prefill", action="store_true",
                   help="on CUDA, launch the kernels of prefill steps of short chunks one by one (decode steps keep "
                        "their graphs)")
    p.add_argument("--overlap-decode", choices=("auto", "on", "off"), default="auto",
                   help="launch each decode step before the last one's tokens are taken, so that the host's "
                        "per-token work overlaps the device's step (auto: on CUDA)")
    p.add_argument("--num-scheduler-steps", type=_steps, default=None, metavar="{K,auto}",
                   help="decode steps an overlapped launch runs back to back, each from the last one's tokens on "
                        "the device, their tokens taken and streamed together (vLLM's flag): the host's work of a "
                        "step is paid once for them all (auto: one more while the device waits on the host, one "
                        "fewer while the host waits on it, 1 to 4)")
    p.add_argument("--prefill-padding", choices=("auto", "on", "off"), default="auto",
                   help="let prompt chunks of different lengths share a prefill step, the shorter ones padded "
                        "(exact: the pad positions leave the state as it was; Mamba1, and Mamba2 with a Δ floor of "
                        "0), so a burst of prompts prefills in a few steps (auto: on CUDA)")
    p.add_argument("--mamba-ssm-cache-dtype", choices=("float32", "bfloat16", "float16", "auto"), default="auto",
                   help="dtype the state slots store the SSM states in (vLLM's flag; the steps compute in float32 "
                        "either way). auto: the model's dtype, as vLLM's default and mamba_ssm's generate keep them; "
                        "narrower states halve a large GPU decode batch's state traffic, at one rounding per step "
                        "(on a CPU they leave the compiled decode for PyTorch's slower step)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="keep the states of prompts' prefixes, so that a prompt that starts as an earlier one did "
                        "(a document asked again, a chat's next turn) under the same scale bucket skips those "
                        "tokens' prefill")
    p.add_argument("--prefix-cache-slots", type=_positive_int,
                   help="with --enable-prefix-caching: the prefix states kept, each one slot's bytes (default: as "
                        "many as state slots)")
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1,
                   help="only 1: a Mamba model of a size this server serves fits one device, and a state slot is "
                        "small; for more devices, --data-parallel-size")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def _tls_files(keyfile: Path | None, certfile: Path | None) -> tuple[Path | None, Path | None]:
    """The key and certificate files of HTTPS, both given and present, or neither."""
    if (keyfile is None) != (certfile is None):
        raise ConfigError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if certfile is not None:
        try:  # as uvicorn will load them, so that a bad file stops the start here with its name
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
        except ssl.SSLError as bad:
            raise ConfigError(f"--ssl-certfile {certfile} and --ssl-keyfile {keyfile}: not a PEM certificate and "
                              f"its private key ({bad.reason or bad})") from None
    return keyfile, certfile


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str]:
    """The server's config and the log level. Raises ConfigError when no --model is given and the embedded
    default model is not there."""
    args = build_parser().parse_args(argv)
    if args.prefix_cache_slots is not None and not args.enable_prefix_caching:
        raise ConfigError("--prefix-cache-slots sizes the prefix cache of --enable-prefix-caching, which is off")
    if args.enable_log_requests and args.disable_log_requests:
        raise ConfigError("--enable-log-requests and --disable-log-requests contradict each other")
    if args.tensor_parallel_size != 1:
        raise ConfigError(f"--tensor-parallel-size {args.tensor_parallel_size}: this server runs a model on one "
                          "device; serve on several with --data-parallel-size, one engine a device")
    model = args.model
    if model is None:
        if not DEFAULT_MODEL_DIR.is_dir():
            raise ConfigError(f"no --model given and the embedded default model is missing: {DEFAULT_MODEL_DIR} "
                              "does not exist; pass --model <checkpoint directory>")
        model = DEFAULT_MODEL_DIR
    bank = args.bank
    if bank is None and (model / BANK_DIRNAME).is_dir():
        bank = model / BANK_DIRNAME
    spec = ModelSpec(model, args.tokenizer, bank, args.device, args.dtype, args.backend, args.training_length,
                     args.quantize, args.quantize_embedding, args.chat_template, args.generation_config,
                     args.override_generation_config)
    engine = EngineConfig(args.max_batch_size, args.max_queue, args.prefill_chunk, args.max_prefill_tokens,
                          args.request_timeout, threads=args.threads, cuda_graphs=not args.enforce_eager,
                          prefill_graphs=not args.eager_prefill,
                          overlap_decode={"auto": None, "on": True, "off": False}[args.overlap_decode],
                          num_scheduler_steps=args.num_scheduler_steps,
                          prefill_padding={"auto": None, "on": True, "off": False}[args.prefill_padding],
                          ssm_state_dtype=None if args.mamba_ssm_cache_dtype == "auto" else args.mamba_ssm_cache_dtype,
                          prefix_cache_slots=args.prefix_cache_slots if args.enable_prefix_caching else 0)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    http = HttpConfig(args.host, args.port, api_key, args.served_model_name or model.resolve().name,
                      args.max_context, args.heartbeat, args.max_body_bytes, args.body_timeout, args.header_timeout,
                      args.max_connections, args.shutdown_timeout, tuple(args.allowed_origins),
                      *_tls_files(args.ssl_keyfile, args.ssl_certfile), access_log=not args.disable_uvicorn_access_log,
                      log_requests=args.enable_log_requests)
    config = ServerConfig(spec, engine, http, args.data_parallel_size, args.api_server_count)
    engine_ranks(config)  # refuses a device kind that engines cannot share out
    return config, args.log_level

"""How many state slots (sequences decoded together) a server holds when --max-batch-size is not given, how many
prompt tokens of one request a step prefills when --prefill-chunk is not, and how many in all when
--max-prefill-tokens is not.

A Mamba sequence's whole context is its recurrent state, of a fixed size whatever the context's length (0.8 MB
for the embedded model, about 14 MB for a 1.4b model in bfloat16), so the slots are bounded by the decode batch
that still pays, not by memory as a transformer's KV cache is:
- CPU: 16. Once the weights are read, a step's time grows with its rows, so more rows would mostly lengthen
  every stream's gap between tokens.
- CUDA: up to 256 (vLLM's default number of sequences), and no more than a tenth of the device memory free at
  start holds, which leaves room for a long prompt's prefill. The decode graphs are captured for the powers of
  two up to it.

The chunk (one request's prompt tokens a step) and the prompt tokens of a step (the chunks of the requests
prefilled together in one batch) follow what a prefill's time grows with:
- CPU: chunks of 2048, one chunk a step. A CPU prefill is bound by its arithmetic, so its time grows with its
  tokens: a larger batch of chunks would only hold the decode steps back longer, while the prompts gain nothing
  over running one after another; a chunk bounds how long a long prompt holds the decoding streams back.
- CUDA: chunks of 8192, 16384 tokens a step. A small model's prefill is bound by launching its kernels, not by
  their work, up to several thousand tokens, so a long prompt in short chunks would take several times as long
  as in one piece (bench/RESULTS.md, GPU prefill: 2048 tokens of the 130m shape cost nearly what 8192 do); and a
  batch of several prompts' chunks costs little more than one chunk, so many streams that arrive together start
  decoding after one step instead of one step each. The bound keeps a step's activations small beside the model
  and a step short enough not to stall the decoding streams for long.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from runtime import MambaLM

from .config import EngineConfig

CPU_SLOTS = 16
ACCELERATOR_SLOTS = 256
ACCELERATOR_STATE_SHARE = 0.1  # of the free device memory at start
CPU_PREFILL_CHUNK = CPU_PREFILL_TOKENS = 2048
ACCELERATOR_PREFILL_CHUNK = 8192
ACCELERATOR_PREFILL_TOKENS = 16384


def ssm_state_dtype(model: MambaLM, name: str | None) -> torch.dtype:
    """The dtype the state slots store SSM states in: `name` (--mamba-ssm-cache-dtype), or None: the model's."""
    return model.dtype if name is None else getattr(torch, name)


def slot_bytes(model: MambaLM, ssm_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's recurrent state (every layer's convolution window and SSM state, the latter in
    `ssm_dtype`)."""
    return model.new_state(1, ssm_dtype).nbytes()


def sized(config: EngineConfig, device: torch.device, state_bytes: int) -> EngineConfig:
    """`config` with what it leaves to the device filled in, for states of `state_bytes` each: the prefill chunk
    (within a --max-prefill-tokens given alone), the slots, and the prompt tokens of a step."""
    if config.prefill_chunk is None:
        chunk = default_prefill_chunk(device)
        config = replace(config, prefill_chunk=min(chunk, config.max_prefill_tokens or chunk))
    if config.max_batch_size is None:
        config = replace(config, max_batch_size=default_slots(device, state_bytes))
    if config.max_prefill_tokens is None:
        config = replace(config, max_prefill_tokens=default_prefill_tokens(device, config.chunk))
    return config


def accelerator_slots(free_bytes: int, state_bytes: int) -> int:
    """Slots on an accelerator with `free_bytes` free at start, for states of `state_bytes` each."""
    return max(1, min(ACCELERATOR_SLOTS, int(free_bytes * ACCELERATOR_STATE_SHARE) // state_bytes))


def default_slots(device: torch.device, state_bytes: int) -> int:
    """The slots of a server on `device`, for states of `state_bytes` each (`slot_bytes`), when --max-batch-size
    is not given."""
    if device.type != "cuda":
        return CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(device)
    return accelerator_slots(free, state_bytes)


def default_prefill_chunk(device: torch.device) -> int:
    """The prompt tokens of one request one step of a server on `device` prefills when --prefill-chunk is not
    given."""
    return CPU_PREFILL_CHUNK if device.type != "cuda" else ACCELERATOR_PREFILL_CHUNK


def default_prefill_tokens(device: torch.device, prefill_chunk: int) -> int:
    """The prompt tokens one step of a server on `device` prefills when --max-prefill-tokens is not given: never
    fewer than one chunk of `prefill_chunk` tokens."""
    tokens = CPU_PREFILL_TOKENS if device.type != "cuda" else ACCELERATOR_PREFILL_TOKENS
    return max(tokens, prefill_chunk)

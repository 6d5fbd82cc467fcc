"""State slots sized from the device and the model when --max-batch-size is not given, a request's prefill chunk
from the device when --prefill-chunk is not, and a step's prefill tokens when --max-prefill-tokens is not
(server.slots)."""

from __future__ import annotations

import httpx
import torch

from runtime import load_model
from server.slots import ACCELERATOR_SLOTS, CPU_SLOTS, accelerator_slots, default_prefill_chunk, default_prefill_tokens
from server_helpers import LiveServer
from test_engine_behaviour import metric


def test_a_cpu_server_without_max_batch_size_holds_16_slots_and_reports_their_bytes(model_dirs):
    model = load_model(model_dirs["mamba1"]).model
    config = model.config
    # per layer: the convolution window (d_inner, d_conv - 1) and the SSM state (d_inner, d_state), float32
    expected_bytes = config.n_layer * config.d_inner * (config.d_conv - 1 + config.d_state) * 4
    with LiveServer(["--model", str(model_dirs["mamba1"])]) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert server.engine.config.slots == CPU_SLOTS and server.engine.config.prefill_tokens == 2048
        assert server.engine.config.chunk == 2048
        assert metric(client, "mamba_server_state_slots") == CPU_SLOTS
        assert metric(client, "mamba_server_state_slot_bytes") == expected_bytes
        too_many = client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 1, "n": CPU_SLOTS + 1})
        assert too_many.status_code == 400 and "n" in too_many.json()["error"]["param"]


def test_max_batch_size_and_max_prefill_tokens_given_are_kept(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), "--max-batch-size", "3", "--max-prefill-tokens",
                     "5000"]) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert server.engine.config.slots == 3 and metric(client, "mamba_server_state_slots") == 3
        assert server.engine.config.prefill_tokens == 5000


def test_a_max_prefill_tokens_below_the_devices_chunk_bounds_the_chunk_too(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), "--max-prefill-tokens", "1000"]) as server:
        assert server.engine.config.chunk == server.engine.config.prefill_tokens == 1000


def test_a_steps_prefill_tokens_are_one_chunk_on_cpu_more_on_cuda_and_never_below_a_chunk():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_prefill_chunk(cpu) == 2048 and default_prefill_chunk(cuda) == 8192
    assert default_prefill_tokens(cpu, 2048) == 2048
    assert default_prefill_tokens(cuda, 2048) == 16384
    assert default_prefill_tokens(cpu, 4096) == 4096 and default_prefill_tokens(cuda, 32768) == 32768


def test_accelerator_slots_take_a_tenth_of_free_memory_up_to_256():
    mb = 2**20
    assert accelerator_slots(free_bytes=100_000 * mb, state_bytes=14 * mb) == ACCELERATOR_SLOTS  # 1.4b on an H200
    assert accelerator_slots(free_bytes=1_000 * mb, state_bytes=14 * mb) == 7  # 100 MB of a nearly full card
    assert accelerator_slots(free_bytes=10 * mb, state_bytes=14 * mb) == 1  # never none


def test_bfloat16_ssm_states_halve_their_bytes_and_serve(model_dirs):
    """--mamba-ssm-cache-dtype: the slots store SSM states in bfloat16 (the convolution windows stay in the
    model's dtype), the slot bytes say so, and completions are served from them; auto, the default, is the model's
    dtype."""
    config = load_model(model_dirs["mamba1"]).model.config
    window = config.n_layer * config.d_inner * (config.d_conv - 1) * 4  # float32, the model's dtype on CPU
    ssm = config.n_layer * config.d_inner * config.d_state
    for flags, expected_bytes in ((["--mamba-ssm-cache-dtype", "bfloat16"], window + 2 * ssm),
                                  (["--mamba-ssm-cache-dtype", "auto"], window + 4 * ssm),
                                  (["--dtype", "bfloat16"], window // 2 + 2 * ssm)):  # the default: the model's
        with LiveServer(["--model", str(model_dirs["mamba1"]), *flags]) as server, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            assert metric(client, "mamba_server_state_slot_bytes") == expected_bytes
            body = client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 8, "temperature": 0,
                                                         "ignore_eos": True}).json()
            assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["text"]

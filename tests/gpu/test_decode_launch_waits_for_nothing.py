"""A decode step is launched while the one before it still runs (the overlap): queueing it must not wait for the
device, or the device idles while the host queues each step; nor must queueing a prefill step. PyTorch's
synchronisation check turns every wait (a copy from pageable memory, a read back) into an error (runs only where
CUDA is)."""

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from scale_sets import delta_and_a_scales  # noqa: E402

from runtime import Extension, load_model  # noqa: E402
from runtime.ops.launch_classes import SHORT_CHUNK  # noqa: E402
from scale_bank import NONE  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.model_runner import ModelRunner  # noqa: E402
from server.request import SamplingParams  # noqa: E402
from server.sampling import choose  # noqa: E402


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_launching_decode_steps_and_choosing_their_tokens_waits_for_nothing(checkpoints, arch):
    model = load_model(checkpoints[arch], device="cuda", dtype="bfloat16").model
    delta, _ = delta_and_a_scales(model.config)
    runner = ModelRunner(model, EngineConfig(max_batch_size=4), {"4k": Extension(scales=delta)})
    runner.warm_up()
    params = [SamplingParams(8, temperature=0.0), SamplingParams(8, temperature=0.8, top_p=0.9, top_k=5, min_p=0.05,
                                                                 seed=1)]
    generators = [random.Random(i) for i in range(2)]
    with torch.no_grad():
        tokens = runner.decode([0, 1], [3, 4], [NONE, "4k"])[:, :100].argmax(-1)  # (2,) on the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):  # each step from the last one's tokens, never read back
                tokens = choose(runner.decode([0, 1], tokens, [NONE, "4k"])[:, :100], params, generators)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (2,) and tokens.device.type == "cuda"


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("longest", [SHORT_CHUNK, 300])  # the short chunks' kernels and the long ones'
@pytest.mark.parametrize("whole", [True, False])  # every position kept (eager), or the last (short: a graph)
def test_launching_a_prefill_step_waits_for_nothing(checkpoints, arch, longest, whole):
    """A prefill step queued behind the device's work (its token ids, slots and row lengths copied from pinned
    memory): rows of different lengths, a first chunk beside continued ones, under two buckets' scales."""
    model = load_model(checkpoints[arch], device="cuda", dtype="bfloat16").model
    delta, _ = delta_and_a_scales(model.config)
    runner = ModelRunner(model, EngineConfig(max_batch_size=4), {"4k": Extension(scales=delta)})
    runner.warm_up()
    chunks = [[5] * longest, [6] * (longest // 2 + 1), [7] * (longest - 3)]
    step = ([0, 1, 2], chunks, [True, False, False], [NONE, "4k", "4k"])
    with torch.no_grad():
        runner.prefill(*step, whole=whole)  # the batch's scales prepared
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            hidden, last = runner.prefill(*step, whole=whole)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert last.shape[0] == 3 and (hidden is None) == (not whole and longest <= SHORT_CHUNK)

"""After the model runner's warm-up, serving compiles no Triton kernel: prompt chunks of any length, alone or
batched, first or continuing, with or without scales, launch kernels compiled at start (runs only where CUDA is).
Triton compiles a kernel anew for each class of its integer arguments at first launch; a compile during serving
stalls every stream. Rows of different lengths (padded) and a batch large enough for Mamba1's wide short-scan programs
launch their own variants, which the warm-up runs too."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import triton  # noqa: E402

from checkpoints import VOCAB  # noqa: E402
from scale_sets import delta_and_a_scales  # noqa: E402

from runtime import Extension, load_model  # noqa: E402
from runtime.ops import launch_classes  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.model_runner import ModelRunner  # noqa: E402


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_kernel_compiles_after_the_warm_up(checkpoints, monkeypatch, arch, dtype):
    model = load_model(checkpoints[arch], device="cuda", dtype=dtype).model
    # a batch of three takes Mamba1's wide short-scan programs here (a published shape's burst would)
    monkeypatch.setattr(launch_classes, "WIDE_PAST", 3 * model.config.d_inner)
    delta, a = delta_and_a_scales(model.config)
    runner = ModelRunner(model, EngineConfig(max_batch_size=4, prefill_chunk=4096, max_prefill_tokens=8192),
                         {"4k": Extension(scales=delta), "8k": Extension(scales=a)})
    runner.warm_up()
    compiled: list[str] = []  # each compile after the warm-up: the chunk, the batch and the kernel's variant
    case = ""
    triton.knobs.runtime.jit_post_compile_hook = \
        lambda **kw: compiled.append(f"{case}: {kw['repr']} {kw.get('key')}")
    try:
        tokens = torch.Generator().manual_seed(1)
        with torch.no_grad():
            # chunks up to the prefill chunk, Mamba2's of one, a few and 16 SSD chunks among them
            for length in [*range(1, 41), 64, 100, 255, 256, 257, 300, 1000, 2048, 4000, 4096]:
                for slots, firsts, buckets, padded in (([0], [True], ["none"], False),
                                                       ([1, 2], [True, True], ["4k", "4k"], False),
                                                       ([1, 2], [False, True], ["8k", "none"], False),
                                                       ([0, 1, 3], [False, False, False], ["none", "8k", "4k"], False),
                                                       ([1, 2], [False, True], ["4k", "8k"], True),
                                                       ([0, 1, 3], [True, False, True], ["none"] * 3, True)):
                    case = f"chunks of {length} tokens, batch {buckets}, first {firsts}, padded {padded}"
                    prompt = torch.randint(0, VOCAB, (len(slots), length), generator=tokens).tolist()
                    if padded:  # the last row half as long (rounded up), as the scheduler pads rows
                        prompt[-1] = prompt[-1][:(length + 1) // 2]
                    runner.prefill(slots, prompt, firsts, buckets)
                    torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
    assert not compiled, f"{len(compiled)} compiles after the warm-up:\n" + "\n".join(compiled[:8])

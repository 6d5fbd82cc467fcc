"""Short prefill steps through captured CUDA graphs against the eager prefill on the same states (runs only where
CUDA is)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from checkpoints import VOCAB  # noqa: E402
from scale_sets import delta_and_a_scales  # noqa: E402

from runtime import Extension, load_model  # noqa: E402
from scale_bank import NONE  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.model_runner import ModelRunner  # noqa: E402

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
SLOTS = 5


def _relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_graphed_prefill_step_equals_the_eager_one_and_touches_only_its_rows(checkpoints, arch, dtype):
    """Rows of different lengths padded to the graph's, a pad row on the scratch row, a first chunk beside
    continued ones, under a Δ set, identity and an A-spectrum set; the graphs all captured by the warm-up."""
    model = load_model(checkpoints[arch], device="cuda", dtype=dtype).model
    delta, a = delta_and_a_scales(model.config)
    extensions = {"4k": Extension(scales=delta), "8k": Extension(scales=a)}
    config = EngineConfig(max_batch_size=SLOTS, prefill_chunk=64, max_prefill_tokens=256)
    graphed = ModelRunner(model, config, extensions)
    eager = ModelRunner(model, EngineConfig(max_batch_size=SLOTS, cuda_graphs=False), extensions)
    assert graphed.prefill_graphs is not None and eager.prefill_graphs is None
    graphed.warm_up()
    captured = set(graphed.prefill_graphs.graphs)
    assert not graphed.prefill_graphs.takes(5, 64)  # 5 rows of 64 tokens: the 5-row graph is past the budget
    g = torch.Generator().manual_seed(7)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    history = [tokens(9 + slot) for slot in range(SLOTS)]  # every slot holds a state: a stray write would show
    for runner in (graphed, eager):
        for slot in range(SLOTS):
            runner.prefill([slot], [history[slot]], [True], [NONE])
    slots, buckets, firsts = [3, 0, 4], ["4k", NONE, "8k"], [False, True, False]
    with torch.no_grad():
        for lengths in ([5, 17, 33], [64, 1, 16]):  # the graphs of 4 rows × 48 and × 64 tokens
            chunks = [tokens(n) for n in lengths]
            got = graphed.prefill(slots, chunks, firsts, buckets, whole=False)
            want = eager.prefill(slots, chunks, firsts, buckets, whole=False)
            assert got.hidden is None and want.hidden is not None
            assert got.last.shape == want.last.shape == (3, model.config.d_model)
            assert _relative(got.last, want.last) < TOLERANCE[dtype]
            for layer in range(model.config.n_layer):
                for mine, theirs in ((graphed.pool.conv[layer][:SLOTS], eager.pool.conv[layer][:SLOTS]),
                                     (graphed.pool.ssm[layer][:SLOTS], eager.pool.ssm[layer][:SLOTS])):
                    assert _relative(mine, theirs) < TOLERANCE[dtype]
            firsts = [False] * 3
        tokens_now = model.logits(want.last).argmax(-1).tolist()
        for _ in range(3):  # decode goes on from the graphs' states as from the eager ones
            logits = graphed.decode(slots, tokens_now, buckets)
            assert _relative(logits, eager.decode(slots, tokens_now, buckets)) < TOLERANCE[dtype]
            tokens_now = logits.argmax(-1).tolist()
    assert set(graphed.prefill_graphs.graphs) == captured  # nothing captured while serving

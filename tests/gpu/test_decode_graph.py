"""Decode through captured CUDA graphs against eager decode on the same pool (runs only where CUDA is)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from checkpoints import VOCAB  # noqa: E402
from scale_sets import delta_and_a_scales  # noqa: E402

from runtime import ScaleMethod, ScaleSet, batch_scales, load_model  # noqa: E402
from runtime.decode_graph import DecodeGraphs  # noqa: E402
from runtime.graph_capture import graph_sizes  # noqa: E402

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def _relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_graph_sizes_cover_every_batch():
    assert graph_sizes(1) == [1] and graph_sizes(6) == [1, 2, 4, 6] and graph_sizes(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_equals_eager_and_touches_only_its_rows(checkpoints, arch, dtype):
    model = load_model(checkpoints[arch], device="cuda", dtype=dtype).model
    config = model.config
    delta, a = delta_and_a_scales(config)
    sets, slots = [delta, None, a], torch.tensor([4, 0, 2], device="cuda")
    scales = batch_scales(sets, config, "cuda")

    eager_pool = model.new_state(6)  # 5 slots and the scratch row
    for row in range(5):  # every row holds some history, so that a stray write would show
        prompt = torch.randint(0, VOCAB, (1, 20 + row), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(row))
        row_scales = batch_scales([sets[slots.tolist().index(row)] if row in slots.tolist() else None], config, "cuda")
        eager_pool.write_rows([row], model.prefill(prompt, scales=row_scales)[1])
    graph_pool = eager_pool.clone()
    graphs = DecodeGraphs(model, graph_pool)

    tokens = torch.tensor([1, 2, 3], device="cuda")
    for _ in range(6):
        state = eager_pool.rows(slots)
        want = model.step(tokens, state, scales)
        eager_pool.write_rows(slots, state)
        got = graphs.step(tokens, slots, scales)  # batch 3 runs in the size-4 graph, one padding row
        assert got.shape == want.shape and _relative(got, want) < TOLERANCE[dtype]
        tokens = want.argmax(-1)
    assert list(graphs.graphs) == [(4, True, True)]
    for row in range(5):
        for mine, theirs in zip(graph_pool.rows([row]).ssm + graph_pool.rows([row]).conv,
                                eager_pool.rows([row]).ssm + eager_pool.rows([row]).conv):
            assert _relative(mine, theirs) < TOLERANCE[dtype] or mine.abs().max() == theirs.abs().max() == 0

    single = graphs.step(torch.tensor([5], device="cuda"), torch.tensor([1], device="cuda"), None)
    state = eager_pool.rows([1])
    assert _relative(single, model.step(torch.tensor([5], device="cuda"), state, None)) < TOLERANCE[dtype]
    assert (1, False, False) in graphs.graphs


def test_capture_at_start_covers_every_size_and_step_then_captures_nothing(checkpoints):
    model = load_model(checkpoints["mamba1"], device="cuda", dtype="float32").model
    graphs = DecodeGraphs(model, model.new_state(7))  # 6 slots: sizes 1, 2, 4, 6
    graphs.capture([(False, False), (True, False)])
    assert sorted(graphs.graphs) == sorted((s, d, False) for s in (1, 2, 4, 6) for d in (False, True))
    config = model.config
    delta = ScaleSet(ScaleMethod.DELTA, tuple(torch.full((config.scale_channels,), 1.5) for _ in range(config.n_layer)))
    graphs.step(torch.tensor([1, 2, 3], device="cuda"), torch.tensor([0, 1, 2], device="cuda"),
                batch_scales([delta, None, delta], config, "cuda"))
    assert len(graphs.graphs) == 8

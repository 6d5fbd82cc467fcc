"""What a short prefill step's CUDA graph captures (`runtime.prefill_graph.prefill_block`), run eagerly here,
against the model runner's own prefill of the same chunks: the rows padded to the graph's chunk length, the batch
padded with rows on a scratch slot, the scales read from the graphs' static rows. (Capture and replay themselves:
tests/gpu/test_prefill_graph.py.)"""

import pytest
import torch
from checkpoints import VOCAB
from scale_sets import delta_and_a_scales
from short_kernels import use_short_convolution, use_short_scans

from runtime import Extension, InferenceState, batch_scales, load_model
from runtime.graph_capture import StaticScales, scale_fields
from runtime.prefill_graph import input_block, prefill_block, prefill_graph_sizes
from scale_bank import NONE
from server.config import EngineConfig
from server.model_runner import ModelRunner

SLOTS, WIDTH, GRAPH_ROWS = 5, 64, 4  # the block's chunk columns; a batch of 3 in the graph of 4 rows


def test_prefill_graph_sizes_hold_every_batch_within_eight_rows_up_to_64():
    for slots in (1, 3, 8, 63, 64, 65, 100, 256):
        sizes = prefill_graph_sizes(slots)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == slots
        for batch in range(1, slots + 1):
            padded = next(size for size in sizes if size >= batch)
            assert padded - batch < (8 if batch <= 64 else 32)


@pytest.mark.parametrize("kernels", ["torch", "short"])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_a_prefill_block_is_the_runners_prefill_and_touches_only_its_rows(checkpoints, monkeypatch, arch, kernels):
    """On the PyTorch back-end's operators, and on the CUDA back-end's short-chunk kernels (interpreted here), which
    stop each padded row at its own end."""
    if kernels == "short":  # interpreted on CPU tensors; on a GPU, tests/gpu/test_prefill_graph.py runs them
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the short kernels run on CUDA tensors there: tests/gpu/test_prefill_graph.py")
    model = load_model(checkpoints[arch]).model
    delta, a = delta_and_a_scales(model.config)
    runner = ModelRunner(model, EngineConfig(max_batch_size=SLOTS), {"4k": Extension(scales=delta),
                                                                     "8k": Extension(scales=a)})
    g = torch.Generator().manual_seed(7)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    for slot in range(SLOTS):  # every slot holds a state: a stray write, or a fresh row reading one, would show
        runner.prefill([slot], [tokens(9 + slot)], [True], [NONE])
    pool = InferenceState.cat([runner.pool.clone(), model.new_state(1)])  # the same rows, and a scratch row
    rows = StaticScales(model.config, GRAPH_ROWS, torch.device("cpu"))
    slots, buckets, firsts, sets = [3, 0, 4], ["4k", NONE, "8k"], [False, True, False], [delta, None, a]
    scales = batch_scales(sets, model.config, "cpu")
    rows.fill(scales, len(slots), GRAPH_ROWS)
    with torch.no_grad():
        for lengths, padded in (([5, 17, 33], 48), ([64, 1, 16], 64)):
            chunks = [tokens(n) for n in lengths]
            want = runner.prefill(slots, chunks, firsts, buckets, whole=False)
            block = torch.tensor(input_block(chunks, slots, firsts, WIDTH, SLOTS, GRAPH_ROWS))  # (4, 67)
            with monkeypatch.context() as patched:
                if kernels == "short":
                    use_short_convolution(patched)
                    use_short_scans(patched)
                got = prefill_block(model, pool, block, padded, rows.view(GRAPH_ROWS, scale_fields(scales)))  # (4, D)
            torch.testing.assert_close(got[:len(slots)], want.last, rtol=1e-5, atol=1e-5)
            for mine, theirs in zip(pool.conv + pool.ssm, runner.pool.conv + runner.pool.ssm):
                torch.testing.assert_close(mine[:SLOTS], theirs, rtol=1e-5, atol=1e-5)
            firsts = [False] * 3

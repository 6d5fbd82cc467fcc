"""The model runner: a scale bucket's extension is its table's, its scales are prepared once and reused, a
batch's once per composition, what it runs equals the model run directly with the same extensions, and a batch of
prompt chunks gives each sequence what it would get alone."""

import pytest
import torch

from runtime import IDENTITY, Decimation, Extension, ScaleMethod, ScaleSet, batch_scales, load_model
from runtime.graph_capture import fields_of_batches
from server.config import EngineConfig
from server.model_runner import ModelRunner


def _delta_set(config, value):
    layers = tuple(torch.full((config.scale_channels,), value) for _ in range(config.n_layer))
    return ScaleSet(ScaleMethod.DELTA, layers)


def test_prefill_then_decode_equal_the_model_with_the_same_scales(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    config = model.config
    scaled = Extension(scales=_delta_set(config, 1.5))
    runner = ModelRunner(model, EngineConfig(max_batch_size=3), {"4k": scaled})
    prompts = {0: [5, 6, 7, 8], 2: [9, 10, 11]}
    buckets = {0: "4k", 2: "none"}
    for slot, prompt in prompts.items():
        runner.prefill([slot], [prompt[:2]], [True], [buckets[slot]])
        runner.prefill([slot], [prompt[2:]], [False], [buckets[slot]])  # a second chunk continues the first
    got = runner.decode([0, 2], [1, 2], ["4k", "none"])

    sets = [scaled.scales, None]
    want_states = [model.prefill(torch.tensor([prompt]), scales=batch_scales([s], config, "cpu"))[1]
                   for prompt, s in zip(prompts.values(), sets)]
    state = want_states[0].cat(want_states)
    want = model.step(torch.tensor([1, 2]), state, batch_scales(sets, config, "cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scales_are_prepared_once_per_extension_and_per_batch(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    scaled = Extension(scales=_delta_set(model.config, 1.5))
    runner = ModelRunner(model, EngineConfig(max_batch_size=2), {"4k": scaled})
    assert runner.extensions == {"none": IDENTITY, "4k": scaled}
    assert runner._prefill_scales_of((scaled,)) is runner._prefill_scales_of((scaled,))  # and folded constants
    assert runner._prefill_scales_of((IDENTITY,)) is None
    runner.prefill([0, 1], [[1, 2], [3, 4]], [True, True], ["4k", "none"])
    prepared = runner._prefill_batch.prepared
    runner.prefill([0, 1], [[5], [6]], [False, False], ["4k", "none"])
    assert runner._prefill_batch.prepared is prepared  # chunks that advance together reuse their scales
    runner.decode([0, 1], [1, 2], ["4k", "none"])
    prepared = runner._decode_batch.prepared
    runner.decode([0, 1], [3, 4], ["4k", "none"])
    assert runner._decode_batch.prepared is prepared  # the same composition: the graphs' buffers stay as filled
    runner.decode([1, 0], [3, 4], ["none", "4k"])
    assert runner._decode_batch.prepared is not prepared


def test_a_decimating_extension_drops_prompt_positions(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    runner = ModelRunner(model, EngineConfig(max_batch_size=1), {"1k": Extension(decimation=Decimation(1, l_base=8))})
    hidden, last = runner.prefill([0], [list(range(1, 40))], [True], ["1k"])
    assert hidden is not None and hidden.shape[1] == 9  # l_base + the last token
    assert torch.equal(last, hidden[:, -1])  # the prompt's last token


def test_graph_scale_fields_cover_every_batch_of_the_banks_sets(checkpoints):
    config = load_model(checkpoints["mamba1"]).config
    delta = _delta_set(config, 1.5)
    a = ScaleSet(ScaleMethod.A_SPECTRUM, delta.layers)
    assert fields_of_batches([]) == [(False, False)]
    assert fields_of_batches([delta, delta]) == [(False, False), (True, False)]
    assert fields_of_batches([delta, a]) == [(False, False), (False, True), (True, False), (True, True)]


def _extensions(config) -> dict[str, Extension]:
    """A Δ scale set and an A-spectrum scale set, per channel (Mamba1) or head (Mamba2), far from 1."""
    g = torch.Generator().manual_seed(3)

    def scales(low: float) -> tuple[torch.Tensor, ...]:
        return tuple(low + 2 * torch.rand(config.scale_channels, generator=g) for _ in range(config.n_layer))

    return {"delta": Extension(scales=ScaleSet(ScaleMethod.DELTA, scales(0.3))),
            "a": Extension(scales=ScaleSet(ScaleMethod.A_SPECTRUM, scales(0.2)))}


def _same_as_alone(batched: ModelRunner, alone: ModelRunner, slots: list[int], chunks: list[list[int]],
                   firsts: list[bool], buckets: list[str]) -> None:
    """One batched prefill against each sequence's alone: hidden states, states, and 4 greedy decode steps."""
    got = batched.prefill(slots, chunks, firsts, buckets).hidden  # (b, c, D)
    for row, slot in enumerate(slots):
        want = alone.prefill([slot], [chunks[row]], [firsts[row]], [buckets[row]]).hidden  # (1, c, D)
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(batched.pool.rows([slot]).ssm, alone.pool.rows([slot]).ssm):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    tokens = batched.model.logits(got[:, -1]).argmax(-1).tolist()  # (b,): the greedy first tokens
    for _ in range(4):
        logits = batched.decode(slots, tokens, buckets)  # (b, V)
        solo = torch.cat([alone.decode([slot], [token], [b]) for slot, token, b in zip(slots, tokens, buckets)])
        torch.testing.assert_close(logits, solo, rtol=1e-5, atol=1e-5)
        tokens = logits.argmax(-1).tolist()
        assert tokens == solo.argmax(-1).tolist()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_a_batch_of_chunks_gives_each_sequence_what_it_gets_alone(checkpoints, arch):
    """Fresh and continued chunks of one length, each sequence with its own extension, in one batch: each row's
    hidden states and state, and the greedy tokens decoded after, are those of the sequence prefilled alone
    with the same chunks. Every slot held another sequence's state before (a fresh row must not continue it)."""
    model = load_model(checkpoints[arch]).model
    g = torch.Generator().manual_seed(4)
    buckets = ["none", "delta", "a", "delta", "a", "none"]  # slot i's
    before = [0, 5, 9, 0, 0, 3]  # prompt tokens slot i prefilled alone before the batch (0: the batch's are first)
    prompts = [torch.randint(1, 96, (n + 12,), generator=g).tolist() for n in before]
    batched, alone = (ModelRunner(model, EngineConfig(max_batch_size=len(buckets)), _extensions(model.config))
                      for _ in range(2))
    slots = list(range(len(buckets)))
    for runner in (batched, alone):
        runner.prefill(slots, [[7, 8, 9]] * len(slots), [True] * len(slots), ["none"] * len(slots))  # stale
        for slot, n in enumerate(before):
            if n:
                runner.prefill([slot], [prompts[slot][:n]], [True], [buckets[slot]])
    _same_as_alone(batched, alone, slots, [p[-12:] for p in prompts], [n == 0 for n in before], buckets)
    fresh = [1, 2, 5]  # fresh chunks only (no state: the path every first chunk takes)
    _same_as_alone(batched, alone, fresh, [prompts[s][:12] for s in fresh], [True] * 3, [buckets[s] for s in fresh])


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_chunks_of_different_lengths_in_one_batch_equal_each_alone(checkpoints, arch):
    """Rows padded on the right, each with a Δ of 0 at its pad positions: every sequence's hidden states at its real
    positions and its states after its last real token are what it gets alone, whether it starts from zero or
    continues its slot's state, under a Δ set, identity or an A-spectrum set."""
    model = load_model(checkpoints[arch]).model
    delta, a = _delta_set(model.config, 1.5), ScaleSet(ScaleMethod.A_SPECTRUM, tuple(
        torch.tensor(0.7) for _ in range(model.config.n_layer)))
    extensions = {"4k": Extension(scales=delta), "8k": Extension(scales=a)}
    slots, buckets = [0, 1, 2, 3], ["4k", "none", "8k", "4k"]
    first_chunks = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    chunks = [[20, 21, 22, 23, 24, 25, 26], [27, 28], [29, 30, 31, 32, 33], [34]]  # 7, 2, 5 and 1 tokens
    firsts = [False, True, False, True]  # slots 1 and 3 start again from zero
    batched, alone = (ModelRunner(model, EngineConfig(max_batch_size=4), extensions) for _ in range(2))
    for runner in (batched, alone):
        runner.prefill(slots, [c[:1] for c in first_chunks], [True] * 4, buckets)
        runner.prefill(slots, [c[1:] or [3] for c in first_chunks], [False] * 4, buckets)  # the carried states
    hidden, last = batched.prefill(slots, chunks, firsts, buckets)  # (4, 7, D), (4, D)
    assert hidden is not None and hidden.shape[:2] == (4, 7)
    for row, (slot, chunk) in enumerate(zip(slots, chunks)):
        want = alone.prefill([slot], [chunk], [firsts[row]], [buckets[row]]).hidden  # (1, len, D)
        torch.testing.assert_close(hidden[row, :len(chunk)], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(last[row], hidden[row, len(chunk) - 1])  # each row's last real token
    for layer in range(model.config.n_layer):
        torch.testing.assert_close(batched.pool.conv[layer][slots], alone.pool.conv[layer][slots], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.pool.ssm[layer][slots], alone.pool.ssm[layer][slots], rtol=1e-5, atol=1e-5)

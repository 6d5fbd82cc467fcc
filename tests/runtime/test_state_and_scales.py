"""Prefill, chunked prefill and decode agree; scale sets act exactly as docs/ARCHITECTURE.md writes them."""

import pytest
import torch
from checkpoints import VOCAB
from reference_model import reference_logits

from runtime import PoolRows, ScaleMethod, ScaleSet, batch_scales, load_model

ARCHS = ["mamba1", "mamba2"]


def _random_set(config, method, granularity, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {"layer": (), "channel": (config.scale_channels,), "channel_state": (config.d_inner, config.d_state)}
    return ScaleSet(ScaleMethod(method),
                    tuple(torch.rand(shape[granularity], generator=g) * 1.5 + 0.25 for _ in range(config.n_layer)))


def _tokens(length, seed, batch=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaled", [False, True])
def test_prefill_split_equals_whole_equals_steps(checkpoints, arch, scaled):
    loaded = load_model(checkpoints[arch])
    model, config = loaded.model, loaded.config
    scales = batch_scales([_random_set(config, "delta", "channel", 0)] if scaled else [None], config, "cpu")
    tokens = _tokens(45, seed=3)
    a, b = tokens[:, :30], tokens[:, 30:]
    whole_logits, whole_state = model.prefill(tokens, scales=scales)
    _, state_a = model.prefill(a, scales=scales)
    split_logits, split_state = model.prefill(b, state_a.clone(), scales=scales)
    chunked_logits, _ = model.prefill(tokens, scales=scales, chunk_len=8)
    torch.testing.assert_close(split_logits, whole_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked_logits, whole_logits, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(split_state.ssm + split_state.conv, whole_state.ssm + whole_state.conv):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    stepped = state_a.clone()
    for t in range(b.shape[1]):
        step_logits = model.step(b[:, t], stepped, scales)
    torch.testing.assert_close(step_logits, whole_logits, rtol=1e-4, atol=1e-4)
    outputs_only = model.hidden_states_only(tokens, scales)  # the same outputs, no state kept
    assert torch.equal(outputs_only, model.hidden_states(tokens, scales=scales)[0])
    torch.testing.assert_close(model.logits(outputs_only[:, -1]), whole_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,granularity", [
    ("delta", "layer"), ("delta", "channel"), ("a_spectrum", "layer"), ("a_spectrum", "channel"),
    ("a_spectrum", "channel_state"),
])
def test_scaled_forward_equals_literal_reference(checkpoints, arch, method, granularity):
    loaded = load_model(checkpoints[arch])
    config = loaded.config
    if granularity == "channel_state" and arch == "mamba2":
        pytest.skip("Mamba2's A is one scalar per head")
    scale_set = _random_set(config, method, granularity, seed=7)
    scale_set.validate(config)
    tokens = _tokens(33, seed=4)
    weights = loaded.model.state_dict()
    per_layer = list(scale_set.layers)
    expected = reference_logits(config, weights, tokens[0].tolist(),
                                delta_scales=per_layer if method == "delta" else None,
                                a_scales=(per_layer if method == "a_spectrum" else None))
    hidden, _ = loaded.model.hidden_states(tokens, scales=batch_scales([scale_set], config, "cpu"))
    got = loaded.model.logits(hidden)[0]
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
    unscaled = loaded.model.logits(loaded.model.hidden_states(tokens)[0])[0]
    assert (unscaled - got).abs().max() > 1e-2, "the scales must change the output"


@pytest.mark.parametrize("arch", ARCHS)
def test_each_sequence_of_a_batch_uses_its_own_scales(checkpoints, arch):
    loaded = load_model(checkpoints[arch])
    model, config = loaded.model, loaded.config
    sets = [_random_set(config, "delta", "channel", 1), None, _random_set(config, "a_spectrum", "layer", 2)]
    tokens = _tokens(20, seed=5, batch=3)
    batch_logits, batch_state = model.prefill(tokens, scales=batch_scales(sets, config, "cpu"))
    solo = [model.prefill(tokens[i:i + 1], scales=batch_scales([s], config, "cpu")) for i, s in enumerate(sets)]
    torch.testing.assert_close(batch_logits, torch.cat([logits for logits, _ in solo]), rtol=1e-4, atol=1e-4)
    next_tokens = _tokens(1, seed=6, batch=3)[:, 0]
    batch_step = model.step(next_tokens, batch_state, batch_scales(sets, config, "cpu"))
    for i, (s, (_, state)) in enumerate(zip(sets, solo)):
        solo_step = model.step(next_tokens[i:i + 1], state, batch_scales([s], config, "cpu"))
        torch.testing.assert_close(batch_step[i:i + 1], solo_step, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,granularity", [("delta", "channel"), ("a_spectrum", "channel_state")])
def test_a_batch_sharing_one_set_equals_the_batch_scaled_sequence_by_sequence(checkpoints, method, granularity):
    """A calibration batch (one set for every sequence) is scanned with the set folded once for all; equal
    but distinct sets take the per-sequence path. Same outputs, and the same gradient on the set."""
    loaded = load_model(checkpoints["mamba1"])
    model, config = loaded.model, loaded.config
    tokens = _tokens(40, seed=11, batch=3)
    base = _random_set(config, method, granularity, 4)
    outputs, grads = [], []
    for shared in (True, False):
        layers = [layer.clone().requires_grad_() for layer in base.layers]
        sets = ([ScaleSet(base.method, tuple(layers))] * 3 if shared  # one object: shared
                else [ScaleSet(base.method, tuple(layers)) for _ in range(3)])  # equal objects: not shared
        scales = batch_scales(sets, config, "cpu")
        assert scales[0].shared == shared
        hidden, _ = model.hidden_states(tokens, scales=scales)
        logits = model.logits(hidden)
        logits.square().mean().backward()
        outputs.append(logits.detach())
        grads.append(torch.stack([layer.grad for layer in layers]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    assert grads[0].abs().max() > 0


def test_identity_scales_equal_no_scales(checkpoints):
    loaded = load_model(checkpoints["mamba1"])
    tokens = _tokens(25, seed=8)
    identity = ScaleSet.identity(loaded.config, ScaleMethod.DELTA, "channel")
    torch.testing.assert_close(loaded.model.prefill(tokens, scales=batch_scales([identity], loaded.config, "cpu"))[0],
                               loaded.model.prefill(tokens)[0])
    assert batch_scales([None, None], loaded.config, "cpu") is None


def test_token_logprobs_in_slices_equal_full_logits(checkpoints):
    model = load_model(checkpoints["mamba2"]).model
    tokens = _tokens(40, seed=9)
    hidden, _ = model.hidden_states(tokens[:, :-1])
    full = torch.log_softmax(model.logits(hidden), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(model.token_logprobs(hidden, tokens[:, 1:], slice_len=7), full)


@pytest.mark.parametrize("bad,fault", [
    (lambda c: [torch.ones(()) for _ in range(c.n_layer - 1)], "layers"),
    (lambda c: [torch.ones(5) for _ in range(c.n_layer)], "shape"),
    (lambda c: [torch.full((), -1.0) for _ in range(c.n_layer)], "non-positive"),
    (lambda c: [torch.full((), float("nan")) for _ in range(c.n_layer)], "non-finite"),
])
def test_bad_scale_sets_are_refused(checkpoints, bad, fault):
    from runtime import ScaleSetError

    config = load_model(checkpoints["mamba1"]).config
    with pytest.raises(ScaleSetError, match=fault):
        ScaleSet(ScaleMethod.DELTA, tuple(bad(config))).validate(config)


def test_channels_first_projections_change_nothing(checkpoints):
    """The layout the CUDA back-end asks for ((b, channels, l) storage) gives the same numbers."""
    import dataclasses

    loaded = load_model(checkpoints["mamba1"])
    tokens = _tokens(30, seed=10)
    scales = batch_scales([_random_set(loaded.config, "delta", "channel", 3)], loaded.config, "cpu")
    expected = loaded.model.logits(loaded.model.hidden_states(tokens, scales=scales)[0])
    backend = dataclasses.replace(loaded.model.backend, channels_first_past=0)  # every chunk channels-first
    for layer in loaded.model.layers:
        layer.mixer.backend = backend
    got = loaded.model.logits(loaded.model.hidden_states(tokens, scales=scales)[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prefill_into_pool_rows_is_a_prefill_then_a_write(checkpoints, arch):
    """Rows 3 and 0 of a pool of 4: row 3 continues its state, row 0 starts afresh; with per-row scales. Both
    rows advance as `hidden_states` then `write_rows` would have them, the other rows stay."""
    model = load_model(checkpoints[arch]).model
    pool = model.new_state(4)
    for t in pool.conv + pool.ssm:
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    expected_pool = pool.clone()
    rows, tokens = torch.tensor([3, 0]), _tokens(12, seed=5, batch=2)
    scales = batch_scales([_random_set(model.config, "delta", "channel", 1), None], model.config, "cpu")
    start = expected_pool.rows(rows)
    for t in start.conv + start.ssm:
        t[1] = 0
    expected_hidden, state = model.hidden_states(tokens, start, scales)
    expected_pool.write_rows(rows, state)

    hidden = model.prefill_rows(tokens, PoolRows(pool, rows, fresh=torch.tensor([False, True])), scales)
    torch.testing.assert_close(hidden, expected_hidden)
    for mine, theirs in zip(pool.conv + pool.ssm, expected_pool.conv + expected_pool.ssm):
        torch.testing.assert_close(mine, theirs)

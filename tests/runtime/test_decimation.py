"""DeciMamba decimation: which positions one layer keeps, that the later layers run on them only, and that a
prompt it drops nothing from runs exactly the base model."""

import pytest
import torch
from checkpoints import VOCAB
from reference_model import reference_logits

from runtime import Decimation, DecimationError, ScaleMethod, ScaleSet, batch_scales, load_model

ARCHS = ["mamba1", "mamba2"]


def _tokens(length, seed, batch=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _delta_with_norms(norms: list[list[float]], channels: int = 3) -> torch.Tensor:
    """(b, l, channels) whose rows have exactly the given ‖Δ_t‖₂, spread over channels with mixed signs."""
    direction = torch.tensor([2.0, -1.0, 2.0][:channels])
    direction = direction / direction.norm()
    return torch.tensor(norms)[..., None] * direction


def test_keeps_the_top_k_by_delta_norm_then_the_last_r_in_order():
    spec = Decimation(layer=0, l_base=3, keep_last=2)
    delta = _delta_with_norms([[5, 1, 9, 2, 7, 3, 0.5, 8, 0.1, 0.2],  # top 3 of the first 8: 2, 7, 4
                               [0.3, 6, 0.2, 0.1, 4, 0.4, 5, 0.6, 9, 9]])  # 1, 6, 4; the tail's size is irrelevant
    kept = spec.kept_positions(delta)
    assert kept.dtype == torch.int64
    assert kept.tolist() == [[2, 4, 7, 8, 9], [1, 4, 6, 8, 9]]


@pytest.mark.parametrize("length, l_base, min_len, keep_last, kept", [
    (10, 3, 0, 2, 5),  # K = L_base = 3, plus R = 2
    (10, 20, 0, 2, 10),  # L_base ≥ L - R: nothing dropped
    (10, 3, 6, 2, 8),  # min_len raises K to 6
    (10, 3, 9, 2, 10),  # min_len beyond L - R: K is capped at L - R
    (3, 1, 0, 5, 3),  # R > L: the whole prompt is the tail
    (1, 1, 0, 1, 1),
])
def test_kept_length_follows_the_decimamba_rule(length, l_base, min_len, keep_last, kept):
    spec = Decimation(layer=0, l_base=l_base, min_len=min_len, keep_last=keep_last)
    assert spec.kept_length(length) == kept and spec.drops(length) == (kept < length)
    norms = [[float((7 * t) % length + 1) for t in range(length)]]
    assert spec.kept_positions(_delta_with_norms(norms)).shape == (1, kept)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaled", [False, True])
def test_decimated_forward_equals_literal_reference(checkpoints, arch, scaled):
    """The later layers see only the kept positions; Δ is ranked as the scan uses it (with any Δ scale)."""
    loaded = load_model(checkpoints[arch])
    config = loaded.config
    scale_set = None
    if scaled:
        g = torch.Generator().manual_seed(1)
        scale_set = ScaleSet(ScaleMethod.DELTA, tuple(torch.rand(config.scale_channels, generator=g) + 0.5
                                                      for _ in range(config.n_layer)))
    spec = Decimation(layer=1, l_base=12, keep_last=5)
    tokens = _tokens(40, seed=2)
    hidden, _ = loaded.model.hidden_states(tokens, scales=batch_scales([scale_set], config, "cpu"), decimation=spec)
    assert hidden.shape == (1, 17, config.d_model)
    expected = reference_logits(config, loaded.model.state_dict(), tokens[0].tolist(),
                                delta_scales=None if scale_set is None else list(scale_set.layers), decimation=spec)
    torch.testing.assert_close(loaded.model.logits(hidden)[0], expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_after_the_decimating_one_run_on_the_shortened_sequence(checkpoints, arch):
    model = load_model(checkpoints[arch]).model
    seen = []
    hooks = [block.mixer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
             for block in model.layers]
    spec = Decimation(layer=0, l_base=10, keep_last=4)
    tokens = _tokens(30, seed=3, batch=2)
    try:
        logits, state = model.prefill(tokens, decimation=spec)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [30] + [14] * (model.config.n_layer - 1)
    base_logits, base_state = model.prefill(tokens)
    assert torch.equal(state.ssm[0], base_state.ssm[0]) and torch.equal(state.conv[0], base_state.conv[0])
    assert not torch.allclose(state.ssm[1], base_state.ssm[1])  # layer 1 saw 14 of the 30 positions
    assert (logits - base_logits).abs().max() > 1e-3
    # each sequence of a batch keeps its own positions
    solo = torch.cat([model.prefill(tokens[i:i + 1], decimation=spec)[0] for i in range(2)])
    torch.testing.assert_close(logits, solo, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [Decimation(layer=1, l_base=25, keep_last=1),  # K = L - R: nothing dropped
                                  Decimation(layer=0, l_base=1, keep_last=30),  # the whole prompt is the tail
                                  Decimation(layer=2, l_base=4, min_len=40)])  # min_len keeps everything
def test_a_decimation_that_drops_nothing_is_the_base_model_bit_for_bit(checkpoints, arch, spec):
    model = load_model(checkpoints[arch]).model
    tokens = _tokens(26, seed=4, batch=2)
    assert not spec.drops(26)
    hidden, state = model.hidden_states(tokens, decimation=spec)
    base_hidden, base_state = model.hidden_states(tokens)
    assert torch.equal(hidden, base_hidden)
    assert all(torch.equal(a, b) for a, b in zip(state.conv + state.ssm, base_state.conv + base_state.ssm))
    assert torch.equal(model.prefill(tokens, decimation=spec)[0], model.prefill(tokens)[0])


def test_decoding_continues_from_a_decimated_prefill(checkpoints):
    """Decode is unchanged: a step after the decimated prefill is one more token through every layer."""
    model = load_model(checkpoints["mamba1"]).model
    spec = Decimation(layer=1, l_base=8, keep_last=2)
    tokens = _tokens(24, seed=5)
    _, state = model.prefill(tokens, decimation=spec)
    before = state.clone()
    logits = model.step(tokens[:, -1], state)
    assert logits.shape == (1, model.config.vocab_size)
    assert all(not torch.equal(a, b) for a, b in zip(state.ssm, before.ssm))


def test_bad_decimations_are_clear_errors(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    n_layer = model.config.n_layer
    with pytest.raises(DecimationError, match="keep_last must be ≥ 1.*got 0"):
        Decimation(layer=0, l_base=8, keep_last=0)
    with pytest.raises(DecimationError, match="layer must be ≥ 0, got -1"):
        Decimation(layer=-1, l_base=8)
    with pytest.raises(DecimationError, match="l_base must be an integer, got '64'"):
        Decimation(layer=0, l_base="64")
    with pytest.raises(DecimationError, match="decimation layer 3 does not exist: the model has 3 layers"):
        Decimation.from_params({"layer": 3, "l_base": 8}, n_layer)
    with pytest.raises(DecimationError, match="unknown 'keep_first'"):
        Decimation.from_params({"layer": 0, "l_base": 8, "keep_first": 2}, n_layer)
    with pytest.raises(DecimationError, match="'l_base' is missing"):
        Decimation.from_params({"layer": 0}, n_layer)
    with pytest.raises(DecimationError, match="beta must be a positive number, got -0.5"):
        Decimation.from_params({"layer": 0, "l_base": 8, "beta": -0.5}, n_layer)
    spec = Decimation.from_params({"layer": 1, "beta": 0.5, "keep_last": 3}, n_layer, default_l_base=48)
    assert spec == Decimation(layer=1, l_base=48, keep_last=3) and spec.to_params()["l_base"] == 48
    with pytest.raises(DecimationError, match="layer 5 does not exist"):
        model.hidden_states(_tokens(20, seed=6), decimation=Decimation(layer=5, l_base=4))
    with pytest.raises(DecimationError, match="whole prompt in one piece: chunk_len 8 is shorter than the prompt's 20"):
        model.prefill(_tokens(20, seed=6), chunk_len=8, decimation=Decimation(layer=0, l_base=4))
    tokens = _tokens(20, seed=6)
    hidden, _ = model.hidden_states(tokens, decimation=Decimation(layer=0, l_base=4, keep_last=2))
    with pytest.raises(ValueError, match=r"hidden states of \(1, 6\) .* targets of \(1, 20\)"):
        model.token_logprobs(hidden, tokens)

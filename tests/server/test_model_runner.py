"""The model runner: an extension's scales are prepared once and reused, a decode batch's once per composition,
and what it runs equals the model run directly with the same extensions."""

import torch

from runtime import IDENTITY, Decimation, Extension, ScaleMethod, ScaleSet, batch_scales, load_model
from runtime.decode_graph import fields_of_batches
from server.config import EngineConfig
from server.model_runner import ModelRunner


def _delta_set(config, value):
    layers = tuple(torch.full((config.scale_channels,), value) for _ in range(config.n_layer))
    return ScaleSet(ScaleMethod.DELTA, layers)


def test_prefill_then_decode_equal_the_model_with_the_same_scales(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    config = model.config
    scaled = Extension(scales=_delta_set(config, 1.5))
    runner = ModelRunner(model, EngineConfig(max_batch_size=3))
    prompts = {0: [5, 6, 7, 8], 2: [9, 10, 11]}
    extensions = {0: scaled, 2: IDENTITY}
    for slot, prompt in prompts.items():
        runner.prefill(slot, prompt[:2], True, extensions[slot])
        runner.prefill(slot, prompt[2:], False, extensions[slot])  # a second chunk continues the first
    got = runner.decode([0, 2], [1, 2], [scaled, IDENTITY])

    sets = [scaled.scales, None]
    want_states = [model.prefill(torch.tensor([prompt]), scales=batch_scales([s], config, "cpu"))[1]
                   for prompt, s in zip(prompts.values(), sets)]
    state = want_states[0].cat(want_states)
    want = model.step(torch.tensor([1, 2]), state, batch_scales(sets, config, "cpu"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scales_are_prepared_once_per_extension_and_per_batch(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    scaled = Extension(scales=_delta_set(model.config, 1.5))
    runner = ModelRunner(model, EngineConfig(max_batch_size=2))
    assert runner._scales_of(scaled) is runner._scales_of(scaled)  # the folded constants are kept with them
    assert runner._scales_of(IDENTITY) is None
    runner.decode([0, 1], [1, 2], [scaled, IDENTITY])
    prepared = runner._decode_scales
    runner.decode([0, 1], [3, 4], [scaled, IDENTITY])
    assert runner._decode_scales is prepared  # the same composition: the graphs' buffers stay as filled
    runner.decode([1, 0], [3, 4], [IDENTITY, scaled])
    assert runner._decode_scales is not prepared


def test_a_decimating_extension_drops_prompt_positions(checkpoints):
    model = load_model(checkpoints["mamba1"]).model
    runner = ModelRunner(model, EngineConfig(max_batch_size=1))
    hidden = runner.prefill(0, list(range(1, 40)), True, Extension(decimation=Decimation(layer=1, l_base=8)))
    assert hidden.shape[1] == 9  # l_base + the last token


def test_graph_scale_fields_cover_every_batch_of_the_banks_sets(checkpoints):
    config = load_model(checkpoints["mamba1"]).config
    delta = _delta_set(config, 1.5)
    a = ScaleSet(ScaleMethod.A_SPECTRUM, delta.layers)
    assert fields_of_batches([]) == [(False, False)]
    assert fields_of_batches([delta, delta]) == [(False, False), (True, False)]
    assert fields_of_batches([delta, a]) == [(False, False), (False, True), (True, False), (True, True)]

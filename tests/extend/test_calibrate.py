"""The calibrators: SPSA converges on a toy objective; back-propagation recovers planted scales."""

import pytest
import torch
from checkpoints import VOCAB
from reference_model import reference_logits

from extend.calibrate import calibrate_bp, calibrate_zo
from extend.losses import Objective
from runtime import ScaleMethod, ScaleSet, batch_scales, load_model


def test_zo_converges_on_a_toy_objective():
    target = torch.tensor([0.5, 2.0, 1.2, 0.8])

    def loss(scale_set, step):
        return 1 + ((torch.stack(scale_set.layers) - target) ** 2).sum()

    init = ScaleSet(ScaleMethod.DELTA, tuple(torch.ones(()) for _ in range(4)))
    result = calibrate_zo(Objective("toy", 0, loss), init, steps=400, lr=0.05, c=0.05, seed=0, progress=False)
    torch.testing.assert_close(torch.stack(result.scales.layers), target, atol=0.05, rtol=0)
    assert result.losses[-1] < result.losses[0]


def test_zo_keeps_scales_positive():
    def loss(scale_set, step):  # pulls every scale towards -1
        return 1 + ((torch.stack(scale_set.layers) + 1) ** 2).sum()

    init = ScaleSet(ScaleMethod.DELTA, tuple(torch.full((), 0.2) for _ in range(3)))
    result = calibrate_zo(Objective("toy", 0, loss), init, steps=100, lr=0.1, c=0.05, progress=False)
    assert all((s >= 0.001).all() for s in result.scales.layers)


@pytest.mark.slow  # hundreds of BP steps
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_bp_recovers_planted_per_channel_scales(checkpoints, arch):
    loaded = load_model(checkpoints[arch])
    model, config = loaded.model, loaded.config
    g = torch.Generator().manual_seed(0)
    planted = ScaleSet(ScaleMethod.DELTA, tuple(torch.rand(config.scale_channels, generator=g) * 1.2 + 0.4
                                                for _ in range(config.n_layer)))
    tokens = torch.randint(0, VOCAB, (8, 48), generator=g)
    with torch.no_grad():
        target, _ = model.hidden_states(tokens, scales=batch_scales([planted] * 8, config, "cpu"))

    def loss(scale_set, step):
        hidden, _ = model.hidden_states(tokens, scales=batch_scales([scale_set] * 8, config, "cpu"))
        return ((hidden - target) ** 2).mean() / target.pow(2).mean()

    init = ScaleSet(ScaleMethod.DELTA, tuple(torch.ones(config.scale_channels) for _ in range(config.n_layer)))
    result = calibrate_bp(Objective("planted", 48, loss), init, steps=300, lr=0.05, progress=False)
    recovered, truth = torch.stack(result.scales.layers), torch.stack(planted.layers)
    assert ((recovered - truth).abs() / truth).max() < 0.05
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_scale_gradients_equal_the_literal_reference(checkpoints, arch):
    loaded = load_model(checkpoints[arch])
    config = loaded.config
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    base = [torch.rand(config.scale_channels, generator=torch.Generator().manual_seed(i)) + 0.5
            for i in range(config.n_layer)]
    ours = [s.clone().double().requires_grad_(True) for s in base]
    theirs = [s.clone().double().requires_grad_(True) for s in base]
    scale_set = ScaleSet(ScaleMethod.DELTA, tuple(s.float() for s in ours))
    hidden, _ = loaded.model.hidden_states(tokens, scales=batch_scales([scale_set], config, "cpu"))
    loaded.model.logits(hidden)[0].logsumexp(-1).sum().backward()
    reference = reference_logits(config, loaded.model.state_dict(), tokens[0].tolist(), delta_scales=theirs)
    reference.logsumexp(-1).sum().backward()
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-3, atol=1e-4)

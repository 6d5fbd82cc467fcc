"""Which models pad prefill rows exactly, and what a padding of rows holds (the prefill through padded rows is
tested against each row alone in tests/server/test_model_runner.py)."""

import dataclasses
import math

import torch

from runtime import Padding, load_model, pads_exactly


def test_mamba1_pads_and_mamba2_pads_only_where_its_delta_floor_is_zero(checkpoints):
    """Mamba2 clamps Δ to dt_limit before any scale: a floor above 0 would make a pad position's Δ the floor."""
    mamba1, mamba2 = (load_model(checkpoints[arch]).config for arch in ("mamba1", "mamba2"))
    assert pads_exactly(mamba1) and pads_exactly(mamba2) and mamba2.dt_limit[0] == 0
    assert not pads_exactly(dataclasses.replace(mamba2, dt_limit=(1e-3, math.inf)))


def test_rows_of_one_length_need_no_padding_and_others_are_silenced_past_their_ends():
    assert Padding.of([5, 5, 5], torch.device("cpu"), 3) is None
    padding = Padding.of([3, 1, 2], torch.device("cpu"), 3)
    assert padding is not None
    dt = padding.silence(torch.zeros(3, 3, 2))
    assert torch.equal(torch.isinf(dt[..., 0]), torch.tensor([[False] * 3, [False, True, True], [False, False, True]]))
    # the convolution state after each row's last real input, k = 3: its last two inputs, the start's where short
    x = torch.arange(1.0, 10.0).reshape(3, 3, 1)  # (b, l, c): rows [1, 2, 3], [4, 5, 6], [7, 8, 9]
    start = -torch.ones(3, 1, 2)
    assert padding.conv_state(x, start).flatten(1).tolist() == [[2, 3], [-1, 4], [7, 8]]

"""How many decode steps an overlapped launch runs (`--num-scheduler-steps`): a fixed count, or `auto`, which
follows whether the device waits on the host."""

import pytest

from server.config import parse_args
from server.multi_step import AUTO_MOST_STEPS, StepCount


def test_a_fixed_count_runs_that_many_steps_whoever_waits():
    count = StepCount(3)
    assert [count.next(idle) for idle in (None, True, True, False, False, False)] == [3] * 6


def test_auto_adds_a_step_while_the_device_waits_on_the_host_and_drops_one_while_the_host_waits():
    count = StepCount(None)
    assert count.next(None) == 1, "it starts at one step, and learns nothing where no launch was in flight"
    climbed = [count.next(True) for _ in range(AUTO_MOST_STEPS + 1)]
    assert climbed == [*range(2, AUTO_MOST_STEPS + 1), AUTO_MOST_STEPS, AUTO_MOST_STEPS]
    assert count.next(None) == AUTO_MOST_STEPS
    fell = [count.next(False) for _ in range(AUTO_MOST_STEPS + 1)]
    assert fell == [*range(AUTO_MOST_STEPS - 1, 0, -1), 1, 1]
    assert [count.next(idle) for idle in (True, False, True, True, False)] == [2, 1, 2, 3, 2], "it settles where "\
        "the host's books of a launch last about as long as its steps"


def test_the_flag_takes_a_count_or_auto_and_names_a_bad_value(model_dirs, capsys):
    model = ["--model", str(model_dirs["mamba1"])]
    assert parse_args(model)[0].engine.num_scheduler_steps is None, "auto by default"
    assert parse_args([*model, "--num-scheduler-steps", "auto"])[0].engine.num_scheduler_steps is None
    assert parse_args([*model, "--num-scheduler-steps", "4"])[0].engine.num_scheduler_steps == 4
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit):
            parse_args([*model, "--num-scheduler-steps", bad])
        assert f"--num-scheduler-steps: must be a positive integer or auto, got {bad}" in capsys.readouterr().err

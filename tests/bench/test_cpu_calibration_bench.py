"""bench.cpu_calibration runs end to end on a tiny model: the compiled backward's step and the peer's."""

import json
import shutil

import pytest

from bench import cpu_calibration
from runtime.ops import cpu_scan_grad
from tokenizers_for_tests import TEXT, train_tokenizer


def test_the_bench_times_a_step_and_the_peers_step(checkpoints, tmp_path):
    if cpu_scan_grad.kernels() is None:
        pytest.skip("no C compiler: the bench refuses to run without the compiled backward")
    model = shutil.copytree(checkpoints["mamba1"], tmp_path / "model")
    train_tokenizer(model / "tokenizer.json")
    books = tmp_path / "books.jsonl"  # four documents: calibration and held-out halves
    books.write_text("".join(json.dumps({"text": TEXT * 10}) + "\n" for _ in range(4)))
    out = tmp_path / "rows.json"
    cpu_calibration.main(["--model", str(model), "--data", str(books), "--lengths", "128", "--peer-lengths", "128",
                          "--batch-size", "2", "--steps", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["length"] == 128 and row["step_s"] > 0 and row["peer_step_s"] > 0 and row["peak_gib"] > 0

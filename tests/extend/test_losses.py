"""A calibration step split into micro-batches (and over ranks) gives the whole batch's loss and gradient."""

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import BOOK_TEXT, tiny_tokenizer

from extend.data import read_documents
from extend.losses import language_model_objective, passkey_objective
from extend.sources import Domain, Mixture
from runtime import ScaleMethod, ScaleSet, load_model
from runtime.tokenizer import Tokenizer
from scale_bank import Bank


def _scales(config, log_scales):
    return lambda: ScaleSet(ScaleMethod.A_SPECTRUM, tuple(torch.exp(p) for p in log_scales))


@pytest.mark.parametrize("task", ["passkey", "ppl"])
def test_micro_batches_give_the_whole_batchs_loss_and_gradient(checkpoints, tmp_path, task):
    loaded = load_model(checkpoints["mamba1"])
    tokenizer = Tokenizer(tiny_tokenizer(tmp_path / "tok.json"))
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"text": BOOK_TEXT * 6}) + "\n" for _ in range(3)))
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": "def f(x):\n    return x + 1\n" * 40}) + "\n" for _ in range(3)))
    mixture = Mixture([Domain.of(n, read_documents([p]), tokenizer) for n, p in (("books", books), ("code", code))],
                      {"books": 1, "code": 1})
    g = torch.Generator().manual_seed(0)
    log_scales = [(torch.randn(loaded.config.d_inner, generator=g) * 0.5).requires_grad_(True)
                  for _ in range(loaded.config.n_layer)]
    results = []
    for micro_batch in (None, 1, 3):
        if task == "passkey":  # slack 0 and strong scales: the hinge's gates are open
            objective = passkey_objective(loaded.model, tokenizer, mixture.haystack, 120, 8, seed=5, checkpoint=False,
                                          text=mixture, ppl_weight=10.0, ppl_slack=0.0, micro_batch=micro_batch)
        else:
            objective = language_model_objective(loaded.model, mixture, 120, 6, seed=5, checkpoint=False,
                                                 micro_batch=micro_batch)
        for p in log_scales:
            p.grad = None
        value = objective.run(_scales(loaded.config, log_scales), 0, backward=True)
        results.append((value, [p.grad.clone() for p in log_scales]))
    reference = objective.loss(_scales(loaded.config, log_scales)(), 0)
    for p in log_scales:
        p.grad = None
    reference.backward()
    for value, grads in results:
        assert value == pytest.approx(reference.item(), rel=1e-5)
        for grad, p in zip(grads, log_scales):
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in results[0][1])


def _build(model, books, out, *extra, ranks=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    argv = [*launcher, "-m", "extend.build_bank", "--model", str(model), "--data", str(books), "--out", str(out),
            "--device", "cpu", "--buckets", "96,128", "--batch-size", "4", "--steps", "3", "--eval-samples", "2",
            "--training-length", "48", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return Bank.load(out)


@pytest.mark.slow  # two processes under torchrun
@pytest.mark.parametrize("flags", [["--task", "passkey", "--calibrator", "bp", "--granularity", "channel",
                                    "--method", "a_spectrum", "--lr", "0.2"],
                                   ["--task", "ppl", "--calibrator", "zo", "--lr", "0.5"]], ids=["bp", "zo"])
def test_two_gloo_ranks_build_the_bank_one_process_builds(checkpoints, tmp_path, flags):
    model = tmp_path / "model"
    model.mkdir()
    for f in checkpoints["mamba1"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    tiny_tokenizer(model / "tokenizer.json")
    books = tmp_path / "books.jsonl"
    sentences = BOOK_TEXT.split(". ")
    books.write_text("".join(json.dumps({"id": f"b{i}", "text": " ".join(
        sentences[(i + j) % len(sentences)] + "." for j in range(60))}) + "\n" for i in range(6)))
    alone = _build(model, books, tmp_path / "alone", *flags)
    split = _build(model, books, tmp_path / "split", *flags, "--micro-batch-size", "1", ranks=2)
    assert alone.buckets == split.buckets == ["96", "128"]
    assert any(alone.entry(name).chosen != "identity" for name in alone.buckets)  # scales to compare
    for name in alone.buckets:
        one, two = alone.entry(name), split.entry(name)
        assert (one.calibrator["world_size"], two.calibrator["world_size"]) == (1, 2)
        assert two.calibrator["micro_batch_size"] == 1 and one.chosen == two.chosen
        assert two.calibrator["final_loss"] == pytest.approx(one.calibrator["final_loss"], rel=1e-5)
        ours, theirs = alone.scale_set(name), split.scale_set(name)
        if ours is not None:
            for a, b in zip(ours.layers, theirs.layers):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)

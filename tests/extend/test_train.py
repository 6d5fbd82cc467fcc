"""The training recipe on CPU at toy size: it learns, and what it writes loads in the runtime and in transformers."""

import json

import torch
from checkpoints import BOOK_TEXT, tiny_tokenizer
from transformers import MambaForCausalLM

import pytest
from extend.train import WEIGHT_DECAY, EarlyStop, make_optimiser, parse_args, passkey_length_limit, train
from runtime import load_model
from runtime.backend import select_backend
from runtime.config import MAMBA1, ModelConfig
from runtime.init_weights import init_weights
from runtime.model import MambaLM


def test_train_learns_and_writes_a_loadable_hugging_face_checkpoint(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok.json")
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 8}) + "\n" for i in range(3)))
    out = tmp_path / "model"
    args = parse_args(["--tokenizer", str(tokenizer), "--data", str(books), "--out", str(out), "--d-model", "16",
                       "--n-layer", "2", "--d-state", "4", "--length", "80", "--steps", "60", "--batch-size", "4",
                       "--warmup", "5", "--lr", "1e-2", "--device", "cpu", "--log-every", "1000"])
    model, losses = train(args)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])

    loaded = load_model(out)
    assert loaded.config.training_context_length == 80 and loaded.layout == "hf"
    assert (out / "tokenizer.json").read_text() == tokenizer.read_text()
    reference = MambaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, loaded.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens, use_cache=False).logits
    got = loaded.model.logits(loaded.model.hidden_states(tokens)[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_passkey_curriculum_grows_the_longest_sample_to_the_training_length():
    args = parse_args(["--tokenizer", "t", "--data", "d", "--out", "o", "--length", "512", "--steps", "1000",
                       "--curriculum", "0.3"])
    limits = [passkey_length_limit(step, args, shortest=64) for step in range(1000)]
    assert limits[0] == 128 and limits[150] == 128 + (513 - 128) // 2 and limits[300] == limits[-1] == 513
    assert limits == sorted(limits)
    args.curriculum = 0
    assert passkey_length_limit(0, args, shortest=64) == 513


def test_initial_delta_spans_the_asked_range():
    model = MambaLM(ModelConfig(arch=MAMBA1, d_model=32, n_layer=2, vocab_size=64, d_state=4),
                    select_backend("torch", "cpu"))
    init_weights(model, seed=0, dt_min=0.01, dt_max=0.1)
    delta = torch.nn.functional.softplus(torch.cat([b.mixer.dt_proj.bias for b in model.layers]))  # Δ at dt = 0
    assert 0.0099 < delta.min() < 0.012 and 0.08 < delta.max() < 0.1001


def test_initial_delta_range_must_be_positive_and_ordered():
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", "t", "--data", "d", "--out", "o", "--dt-min", "0.1", "--dt-max", "0.01"])


def test_ssm_parameters_get_their_own_weight_decay():
    model = MambaLM(ModelConfig(arch=MAMBA1, d_model=32, n_layer=2, vocab_size=64, d_state=4),
                    select_backend("torch", "cpu"))
    rest, ssm = make_optimiser(model, lr=1e-3, ssm_weight_decay=0.0).param_groups
    mixer = model.layers[1].mixer
    ssm_ids = {id(p) for p in ssm["params"]}
    assert ssm["weight_decay"] == 0.0 and rest["weight_decay"] == WEIGHT_DECAY
    assert ssm_ids == {id(p) for block in model.layers
                       for p in (block.mixer.A_log, block.mixer.D, block.mixer.dt_proj.bias)}
    assert id(mixer.dt_proj.weight) not in ssm_ids
    assert len(rest["params"]) + len(ssm["params"]) == len(list(model.parameters()))


def test_early_stop_anneals_after_the_threshold_holds_for_patience_checks():
    stop = EarlyStop(threshold=0.9, patience=2, anneal_steps=100)
    stop.check(step=100, retrieved=0.95, lr=1e-3)
    stop.check(step=200, retrieved=0.5, lr=1e-3)  # a miss resets the count
    stop.check(step=300, retrieved=0.92, lr=1e-3)
    assert stop.stop_step is None and stop.lr(300, 1e-3) == 1e-3
    stop.check(step=400, retrieved=1.0, lr=8e-4)
    assert stop.stop_step == 500
    assert stop.lr(400, 5e-4) == 8e-4 and stop.lr(450, 5e-4) == pytest.approx(4e-4) and stop.lr(500, 5e-4) == 0


def test_train_with_early_stopping_checks_held_out_retrieval(tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "tok.json")
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 8}) + "\n" for i in range(3)))
    args = parse_args(["--tokenizer", str(tokenizer), "--data", str(books), "--out", str(tmp_path / "m"),
                       "--d-model", "16", "--n-layer", "2", "--d-state", "4", "--length", "80", "--steps", "12",
                       "--batch-size", "4", "--warmup", "2", "--device", "cpu", "--stop-at-retrieval", "0.5",
                       "--check-every", "5", "--log-every", "1000"])
    _, losses = train(args)
    checks = [line for line in capsys.readouterr().out.splitlines() if "held-out retrieval" in line]
    assert len(checks) == 2 and len(losses) == 12  # steps 5 and 10; a toy model never retrieves, so no stop
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", "t", "--data", "d", "--out", "o", "--stop-at-retrieval", "1.5"])


def test_training_text_draws_each_source_by_weight_and_the_filler_only_as_a_haystack(tmp_path):
    import random

    from extend.sources import parse_mixture, parse_sources
    from extend.training_text import TrainingText, _windows
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_tokenizer(tmp_path / "tok.json"))
    books, code = tmp_path / "books.jsonl", tmp_path / "code.jsonl"
    books.write_text(json.dumps({"text": "xx " * 400}) + "\n")  # neither "x" nor "7" is in the filler
    code.write_text(json.dumps({"text": "77 " * 400}) + "\n")
    specs = parse_sources([f"books={books},code={code},filler"])
    text = TrainingText.read(specs, parse_mixture("books=3,filler=2", specs), tokenizer,
                             torch.Generator().manual_seed(0))
    windows = [tokenizer.decode(w.tolist()) for w in text.windows(12, 400)]
    assert all(("x" in w) != ("7" in w) for w in windows)  # one source each, never the filler
    assert 0.65 < sum("x" in w for w in windows) / 400 < 0.85  # books 3 : code 1
    rng = random.Random(0)
    haystacks = [tokenizer.decode(text.haystack(12, rng)) for _ in range(600)]
    assert 0.25 < sum("x" not in h and "7" not in h for h in haystacks) / 600 < 0.42  # the filler: 2 of 6
    one = TrainingText.read(parse_sources([str(books)]), {"text": 1.0}, tokenizer, torch.Generator().manual_seed(0))
    stream = one.streams["text"]
    assert torch.equal(one.windows(12, 5), _windows(stream, 12, 5, torch.Generator().manual_seed(0)))


def test_repeated_haystacks_cycle_a_short_span_of_their_source(tmp_path):
    import random

    from extend.sources import parse_sources
    from extend.training_text import REPEATED_SPAN, TrainingText
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_tokenizer(tmp_path / "tok.json"))
    books = tmp_path / "books.jsonl"
    books.write_text(json.dumps({"text": BOOK_TEXT * 8}) + "\n")
    specs = parse_sources([str(books)])
    text = TrainingText.read(specs, {"text": 1.0}, tokenizer, torch.Generator().manual_seed(0), repeated=0.5)
    stream = text.streams["text"].tolist()
    rng = random.Random(0)
    periods = []
    for _ in range(200):
        hay = text.haystack(400, rng)
        assert len(hay) == 400
        period = next((p for p in range(1, REPEATED_SPAN[1] + 1) if hay[p:] == hay[:-p]), None)
        periods.append(period)
        start = hay[:period or 400]  # a span of the source, cycled; or a window of it
        assert any(stream[i:i + len(start)] == start for i in range(len(stream) - len(start) + 1))
    cycled = [p for p in periods if p is not None]
    assert 0.35 < len(cycled) / 200 < 0.65 and all(p <= REPEATED_SPAN[1] for p in cycled)
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", "t", "--data", "d", "--out", "o", "--repeated-haystacks", "1.5"])


def test_train_on_a_mixture_of_sources_and_templates(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "tok.json")
    books, code = tmp_path / "books.jsonl", tmp_path / "code.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 8}) + "\n" for i in range(3)))
    code.write_text("".join(json.dumps({"id": i, "text": "def f(x):\n    return x\n" * 40}) + "\n" for i in range(3)))
    args = parse_args(["--tokenizer", str(tokenizer), "--data", f"books={books},code={code},filler", "--mixture",
                       "books=2", "--templates", "line,inline", "--out", str(tmp_path / "model"), "--d-model", "16",
                       "--n-layer", "2", "--d-state", "4", "--length", "200", "--steps", "3", "--batch-size", "4",
                       "--device", "cpu", "--log-every", "1000"])
    _, losses = train(args)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert load_model(tmp_path / "model").config.training_context_length == 200


def test_a_run_stopped_by_its_time_limit_continues_exactly_where_it_stopped(tmp_path, capsys):
    """Stopped after every step and continued by the same command, a run with early-stopping checks ends with the
    weights and losses of the run that was never stopped, and deletes its state; other flags are refused."""
    from safetensors.torch import load_file

    from extend.train import STATE_FILE, TimeLimitReached

    tokenizer = tiny_tokenizer(tmp_path / "tok.json")
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"id": i, "text": BOOK_TEXT * 8}) + "\n" for i in range(3)))

    def flags(out, *more):
        return ["--tokenizer", str(tokenizer), "--data", str(books), "--out", str(out), "--d-model", "16",
                "--n-layer", "2", "--d-state", "4", "--length", "80", "--steps", "7", "--batch-size", "4",
                "--warmup", "2", "--device", "cpu", "--stop-at-retrieval", "0.5", "--check-every", "3",
                "--templates", "line,inline", "--log-every", "1000", *more]

    _, straight = train(parse_args(flags(tmp_path / "straight")))
    state_dir = tmp_path / "state"
    stopped = flags(tmp_path / "stopped", "--state-dir", str(state_dir), "--time-limit", "0")
    for step in range(6):  # the time limit passes at once: each run takes one step
        with pytest.raises(TimeLimitReached, match=f"after step {step} "):
            train(parse_args(stopped))
        assert (state_dir / STATE_FILE).exists() and not (tmp_path / "stopped").exists()
    with pytest.raises(ValueError, match=r"--lr 0\.002 \(now 0\.001\)"):
        train(parse_args([*stopped, "--lr", "1e-3"]))
    _, continued = train(parse_args(stopped))
    assert continued == straight and len(continued) == 7
    assert not (state_dir / STATE_FILE).exists()
    want, got = (load_file(tmp_path / run / "model.safetensors") for run in ("straight", "stopped"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert capsys.readouterr().out.count("resumed from") == 6  # runs 2-6 and the last
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer", "t", "--data", "d", "--out", "o", "--time-limit", "60"])  # no --state-dir


def test_training_state_restores_the_early_stopping_books_and_every_generator(tmp_path):
    import random

    from extend.train import TrainingState

    args = parse_args(["--tokenizer", "t", "--data", "d", "--out", "o", "--state-dir", str(tmp_path)])

    def fresh(seed):
        model = MambaLM(ModelConfig(arch=MAMBA1, d_model=16, n_layer=1, vocab_size=32, d_state=4),
                        select_backend("torch", "cpu"))
        init_weights(model, seed, 0.001, 0.1)
        generators = {"text": torch.Generator().manual_seed(seed), "validation": torch.Generator().manual_seed(seed)}
        return TrainingState(args, model, make_optimiser(model, 1e-3, 0.1), random.Random(seed), generators,
                             EarlyStop(0.9, 2, 100))

    saved = fresh(0)
    saved.early_stop.check(step=300, retrieved=0.95, lr=1e-3)  # one pass of two
    torch.randn(3, generator=saved.generators["validation"])  # a generator moved on from its seed
    saved.save(301, [1.5, 1.25])
    loaded = fresh(1)
    assert loaded.load() == (301, [1.5, 1.25])
    assert vars(loaded.early_stop) == vars(saved.early_stop) and loaded.early_stop.passes == 1
    assert loaded.rng.random() == saved.rng.random()
    for name in ("text", "validation"):
        assert torch.equal(torch.randn(4, generator=loaded.generators[name]),
                           torch.randn(4, generator=saved.generators[name]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), saved.model.parameters()))

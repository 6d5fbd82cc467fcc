"""The shipped embedded model and its bank: they load together and the model retrieves a pass key."""

import random
from pathlib import Path

import pytest
import torch

from extend.passkey import filler_haystack, make_sample
from runtime import batch_scales, load_model
from runtime.tokenizer import find_tokenizer
from scale_bank import Bank, select

MODEL = Path(__file__).resolve().parents[2] / "models" / "mamba-extend-default"


@pytest.fixture(scope="module")
def shipped():
    loaded = load_model(MODEL)
    return loaded, find_tokenizer(MODEL), Bank.load(MODEL / "bank", loaded.config, loaded.fingerprint)


def _greedy_answer(loaded, prompt: list[int], steps: int, scale_set) -> list[int]:
    scales = batch_scales([scale_set], loaded.config, "cpu")
    logits, state = loaded.model.prefill(torch.tensor([prompt]), scales=scales)
    out = []
    for _ in range(steps):
        token = logits.argmax(-1)
        out.append(token.item())
        logits = loaded.model.step(token, state, scales)
    return out


def test_model_and_bank_belong_together(shipped):
    loaded, tokenizer, bank = shipped
    assert bank.manifest.model["fingerprint"] == loaded.fingerprint
    assert loaded.config.training_context_length == 512
    assert bank.buckets == ["1k", "2k", "4k", "8k", "16k"]
    assert all(bank.entry(b).method == "a_spectrum" and bank.entry(b).granularity == "channel" for b in bank.buckets)
    assert tokenizer.vocab_size <= loaded.config.vocab_size


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_answers_a_512_token_passkey_prompt_greedily(shipped, depth):
    loaded, tokenizer, bank = shipped
    sample = make_sample(tokenizer, 512, depth, random.Random(7), filler_haystack(tokenizer))
    selection = select(bank, 512, "auto", loaded.config.training_context_length)
    assert selection.extension.scales is None  # at the training length the bank applies nothing
    answer = _greedy_answer(loaded, sample.tokens[:sample.answer_start], len(sample.tokens) - sample.answer_start, None)
    assert tokenizer.decode(answer).strip() == sample.key

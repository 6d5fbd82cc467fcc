"""Passkey samples in every template: exact length, the answer last, each template's wording where it belongs."""

import random

import pytest
from checkpoints import EMBEDDED_TOKENIZER

from extend.passkey import (HELD_OUT_WORDS, INSTRUCTION, LEAD_INS, LINE, NEEDLE, TEMPLATES, filler_haystack, make_batch,
                            make_sample, minimum_length, parse_templates)
from runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(EMBEDDED_TOKENIZER)


def _prose(tokenizer):
    words = tokenizer.encode(" the quick brown fox jumps over the lazy dog and runs far away" * 40)
    return lambda length, rng: (words * (length // len(words) + 1))[:length]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_makes_a_sample_of_the_length_asked_with_the_answer_last(tokenizer, name):
    template = TEMPLATES[name]
    sample = make_sample(tokenizer, 300, 0.5, random.Random(3), _prose(tokenizer), template)
    assert len(sample.tokens) == 300
    assert tokenizer.decode(sample.tokens[sample.answer_start:]) == f" {sample.key}"
    text = tokenizer.decode(sample.tokens[:sample.answer_start])
    assert any(text.endswith("\n" + question) for question in template.questions)
    assert NEEDLE.format(key=sample.key) in text
    assert text.startswith(INSTRUCTION + "\n") == (template.instruction is not None)
    shortest = minimum_length(tokenizer, template)  # enough whichever question a sample asks
    for seed in range(8):
        make_sample(tokenizer, shortest, 0.5, random.Random(seed), _prose(tokenizer), template)
    if len(template.questions) == 1:
        with pytest.raises(ValueError, match="needs at least"):
            make_sample(tokenizer, shortest - 1, 0.5, random.Random(3), _prose(tokenizer), template)


def test_an_inline_needle_sits_between_words_not_on_a_line_of_its_own(tokenizer):
    for depth in (0.1, 0.37, 0.8):
        sample = make_sample(tokenizer, 300, depth, random.Random(5), _prose(tokenizer), TEMPLATES["inline"])
        text = tokenizer.decode(sample.tokens[:sample.answer_start])
        needle = NEEDLE.format(key=sample.key)
        before, after = text.split(needle)
        assert before.endswith(" ") and not before.endswith("\n ") and after.startswith(" ")
        assert before[:-1].split(" ")[-1] in "the quick brown fox jumps over lazy dog and runs far away".split()
    line = make_sample(tokenizer, 300, 0.37, random.Random(5), _prose(tokenizer), LINE)
    assert f"\n{NEEDLE.format(key=line.key)}\n" in tokenizer.decode(line.tokens)


def test_a_batch_draws_its_templates_and_the_default_is_the_trained_one(tokenizer):
    rng = random.Random(0)
    mixed = make_batch(tokenizer, 200, 40, rng, filler_haystack(tokenizer), templates=parse_templates("line,reworded"))
    questions = {tokenizer.decode(row.tolist()).rsplit("\n", 1)[1].split(" The pass key is")[0] for row in mixed.tokens}
    assert questions == {"What is the pass key?", "Recall the pass key that was hidden in the text above."}
    default = make_batch(tokenizer, 200, 3, random.Random(0), filler_haystack(tokenizer))
    assert all(tokenizer.decode(row.tolist()).rsplit("\n", 1)[1].startswith(LINE.questions[0])
               for row in default.tokens)
    assert parse_templates("all") == list(TEMPLATES.values())
    with pytest.raises(ValueError, match="unknown passkey template 'fancy'"):
        parse_templates("line,fancy")


def test_paraphrased_samples_ask_in_several_wordings_none_of_them_the_reworded_one(tokenizer):
    rng = random.Random(1)
    asked = {tokenizer.decode(make_sample(tokenizer, 200, 0.5, rng, filler_haystack(tokenizer),
                                          TEMPLATES["paraphrased"]).tokens).rsplit("\n", 1)[1].rsplit(" ", 1)[0]
             for _ in range(40)}
    assert asked <= set(TEMPLATES["paraphrased"].questions) and len(asked) > 20
    held_out = [question for name in ("reworded", "quizzed", "secret") for question in TEMPLATES[name].questions]
    assert not set(TEMPLATES["paraphrased"].questions) & set(held_out + list(LINE.questions))
    assert all(any(word in question.lower() for word in HELD_OUT_WORDS) for question in held_out)
    assert not any(word in question.lower() for question in TEMPLATES["paraphrased"].questions
                   for word in HELD_OUT_WORDS)
    assert len(TEMPLATES["paraphrased"].questions) == 999
    assert any(question.startswith(LEAD_INS[1:]) for question in asked)  # lead-ins are drawn too

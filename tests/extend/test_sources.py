"""Named text sources: parsing, the fixed train/eval part of a file, mixture weights and drawing."""

import json
import random

import pytest
from checkpoints import EMBEDDED_TOKENIZER

from extend.data import DataError, read_documents
from extend.sources import (EVAL_FRACTION, FILLER, Domain, Mixture, SourceSpec, document_part, parse_mixture,
                            parse_sources, read_source)
from runtime.tokenizer import Tokenizer


def _corpus(path, count: int, word: str):
    path.write_text("".join(json.dumps({"title": f"{word} {i}", "text": f"{word} {i}. " * 40}) + "\n"
                            for i in range(count)))
    return path


def test_sources_are_named_split_into_parts_and_bare_paths_join_one_source():
    specs = parse_sources(["books=a.jsonl,docs=b.jsonl+c.jsonl@eval", "filler", "d.txt", "e.txt"])
    assert specs == [SourceSpec("text", ("d.txt", "e.txt")), SourceSpec("books", ("a.jsonl",)),
                     SourceSpec("docs", ("b.jsonl", "c.jsonl"), "eval"), SourceSpec(FILLER, ())]
    assert specs[3].is_filler and specs[2].describe() == "b.jsonl+c.jsonl@eval"


@pytest.mark.parametrize("items,message", [
    (["books=a@test"], "unknown part 'test'"), (["books=a,books=b"], "given twice"),
    (["bad name=a"], "a source name"), (["filler=a"], "a source name"), (["docs=@eval"], "no path"),
    (["a@eval", "b"], "share one part"), ([","], "no data"),
])
def test_bad_source_specs_are_refused_naming_the_item(items, message):
    with pytest.raises(DataError, match=message):
        parse_sources(items)


def test_train_and_eval_parts_are_disjoint_cover_the_file_and_do_not_depend_on_a_seed(tmp_path):
    path = _corpus(tmp_path / "docs.jsonl", 200, "manual")
    train = read_source(SourceSpec("docs", (str(path),), "train"))
    held = read_source(SourceSpec("docs", (str(path),), "eval"))
    every = read_documents([path])
    assert {d.text for d in train}.isdisjoint({d.text for d in held})
    assert len(train) + len(held) == len(every) == 200
    assert abs(len(held) / 200 - EVAL_FRACTION) < 0.1
    assert [document_part(d) for d in every] == [document_part(d) for d in read_documents([path])]


def test_mixture_weights_default_to_one_and_bad_ones_are_refused():
    specs = parse_sources(["books=a,docs=b,filler"])
    assert parse_mixture("docs=3", specs) == {"books": 1.0, "docs": 3.0, FILLER: 1.0}
    for text, message in (("code=1", "no source named 'code'"), ("docs=x", "not a number"), ("docs=-1", "at least 0"),
                          ("books=0,docs=0,filler=0", "every weight is 0")):
        with pytest.raises(DataError, match=message):
            parse_mixture(text, specs)


def test_a_mixture_draws_haystacks_by_weight_and_text_only_from_sources_with_text(tmp_path):
    tokenizer = Tokenizer(EMBEDDED_TOKENIZER)
    code = Domain.of("code", read_documents([_corpus(tmp_path / "code.jsonl", 4, "def")]), tokenizer)
    filler = Domain.of(FILLER, [], tokenizer)
    mixture = Mixture([code, filler], {"code": 1, FILLER: 3})
    rng = random.Random(0)
    drawn = [tokenizer.decode(mixture.haystack(12, rng)) for _ in range(400)]
    from_filler = sum("grass" in text or "sky" in text or "sun" in text for text in drawn) / len(drawn)
    assert 0.65 < from_filler < 0.85
    assert all("def" in tokenizer.decode(mixture.window(12, rng)) for _ in range(20))
    assert Mixture([code, filler], {"code": 0, FILLER: 1}).haystack(12, rng) == filler.haystack(12, rng)
    with pytest.raises(DataError, match="needs text"):
        Mixture([filler], {FILLER: 1}).window(12, rng)


def test_the_perplexity_hinge_holds_for_each_domain_apart(checkpoints, tmp_path):
    """The hinge is the sum of each domain's own excess (a mean over domains would halve it here), so one domain's
    perplexity cannot buy slack for another's."""
    import torch

    from checkpoints import tiny_tokenizer
    from extend.losses import passkey_objective
    from extend.objectives import lm_nll, passkey_scores
    from extend.passkey import make_batch
    from runtime import ScaleMethod, ScaleSet, load_model

    loaded = load_model(checkpoints["mamba1"])
    tokenizer = Tokenizer(tiny_tokenizer(tmp_path / "tok.json"))
    books = Domain.of("books", read_documents([_corpus(tmp_path / "b.jsonl", 3, "Call me Ishmael")]), tokenizer)
    code = Domain.of("code", read_documents([_corpus(tmp_path / "c.jsonl", 3, "def f(x): return 0123")]), tokenizer)
    mixture = Mixture([books, code], {"books": 1, "code": 1})
    scales = ScaleSet(ScaleMethod.DELTA, tuple(torch.tensor(4.0) for _ in range(loaded.config.n_layer)))
    objective = passkey_objective(loaded.model, tokenizer, mixture.haystack, 120, 4, seed=3, checkpoint=False,
                                  text=mixture, ppl_weight=10.0, ppl_slack=0.0)
    rng = random.Random("3:0")  # what the objective draws for step 0, in its order
    batch = make_batch(tokenizer, 120, 4, rng, mixture.haystack, [rng.random() for _ in range(4)])
    expected = passkey_scores(loaded.model, batch, scales)[0].mean()
    excesses = []
    for windows in mixture.batches(120, 1, rng).values():
        excesses.append(lm_nll(loaded.model, windows, scales).mean() - lm_nll(loaded.model, windows, None).mean())
    expected = expected + 10.0 * sum(torch.relu(e) for e in excesses)
    assert len(excesses) == 2 and torch.isclose(objective.loss(scales, 0), expected, rtol=1e-5)

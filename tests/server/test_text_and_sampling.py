"""Incremental detokenisation (UTF-8 hold-back, stop strings split across tokens) with real test tokenizers (a
byte-level BPE and a sentencepiece-style one), and the sampling filters."""

import math
import random

import pytest
import torch

from runtime.tokenizer import Tokenizer
from server.detokenizer import MAX_HELD_TOKENS, OutputText
from server.request import SamplingParams
from server.sampling import _filter, _nucleus, choose, logprob_entries
from tokenizers_for_tests import byte_fallback_tokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dirs) -> Tokenizer:
    return Tokenizer(model_dirs["mamba1"] / "tokenizer.json")


def pushes(tokenizer, text: str, stop=()) -> tuple[list[str], OutputText]:
    out, parts = OutputText(tokenizer, tuple(stop)), []
    for token in tokenizer.encode(text):
        if out.stopped:
            break
        parts.append(out.push(token))
    return parts, out


@pytest.fixture(scope="module", params=["byte-level", "byte-fallback"])
def any_tokenizer(request, tokenizer, tmp_path_factory) -> Tokenizer:
    """The test models' byte-level BPE, whose text is decoded token by token from each token's bytes, and a
    sentencepiece-style one, whose text is decoded from the ids."""
    if request.param == "byte-level":
        return tokenizer
    return Tokenizer(byte_fallback_tokenizer(tmp_path_factory.mktemp("byte-fallback") / "tokenizer.json"))


def test_a_character_split_across_tokens_is_held_until_complete(any_tokenizer):
    ids = any_tokenizer.encode(" €")
    assert len(ids) == 4, "the test text must split € into its three UTF-8 bytes"
    parts, _ = pushes(any_tokenizer, " €")
    assert parts == [" ", "", "", "€"]


def test_invalid_bytes_are_released_rather_than_held_forever(any_tokenizer):
    lead = any_tokenizer.encode("€")[0]  # a lead byte with no continuation is never a character
    out = OutputText(any_tokenizer)
    parts = [out.push(lead) for _ in range(MAX_HELD_TOKENS + 2)]
    if any_tokenizer.byte_pieces() is not None:  # each lead byte goes out once the next shows it incomplete
        assert parts == [""] + ["\ufffd"] * (MAX_HELD_TOKENS + 1)
    else:  # from the text of the ids: held as long as a character can be, then the oldest goes out at each token
        assert parts == [""] * (MAX_HELD_TOKENS - 1) + ["\ufffd"] * 3
    assert "".join(parts) + out.finish() == any_tokenizer.decode([lead] * (MAX_HELD_TOKENS + 2))


def test_a_character_after_invalid_bytes_is_whole(tokenizer):
    """Three lone lead bytes then €, whose three bytes come while the lead bytes are still held."""
    lead, euro = tokenizer.encode("€")[0], tokenizer.encode("€")
    ids = [lead] * 3 + euro
    out = OutputText(tokenizer)
    assert "".join(out.push(token) for token in ids) + out.finish() == tokenizer.decode(ids) == "\ufffd" * 3 + "€"


@pytest.mark.parametrize("skip_special", [False, True])
def test_the_text_pushed_token_by_token_is_the_text_of_the_ids(tokenizer, skip_special):
    """A byte-level tokenizer, random ids (end of text, lone and broken bytes among them): what is released token
    by token, and at the end, is the tokenizer's text of the whole. (A byte-fallback decoder's text of a byte is
    U+FFFD or the byte's character depending on the bytes around it: decoded from the ids, a byte held as long as
    a character can be may come out otherwise.)"""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        out = OutputText(tokenizer, skip_special=skip_special)
        assert "".join(out.push(token) for token in ids) + out.finish() == tokenizer.decode(ids, skip_special)


def test_stop_string_across_a_token_boundary_is_not_emitted(tokenizer):
    assert [tokenizer.decode([t]) for t in tokenizer.encode("the river")] == ["t", "he", " r", "i", "v", "er"]
    parts, out = pushes(tokenizer, "the river", stop=["e r"])
    assert parts[:2] == ["t", "h"]  # "e" could start "e r": held
    assert "".join(parts) + out.finish() == "th" and out.stopped


def test_held_text_that_never_becomes_a_stop_string_is_released(tokenizer):
    parts, out = pushes(tokenizer, "the river", stop=["rx", "ivy"])
    assert parts == ["t", "he", " ", "r", "", "ive"]  # "r", "i", "iv", "r" each could start "rx" or "ivy"
    assert out.finish() == "r" and not out.stopped  # the request ended: the held "r" goes out


def test_the_earliest_stop_string_wins(tokenizer):
    parts, out = pushes(tokenizer, "the pass key is 4821", stop=["key", "pass"])
    assert "".join(parts) + out.finish() == "the "


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    """Each row by its own parameters, in one batch."""
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]) / 0.5).repeat(7, 1)  # the largest 0, as tempered
    top_k, top_p, min_p = [2, 0, 0, 0, 3, 0, 1], [1.0, 0.6, 0.5, 0.01, 0.9, 1.0, 1.0], [0, 0, 0, 0, 0, 0.5, 0]
    _filter(scores, top_k, top_p, min_p)
    assert torch.isfinite(scores).tolist() == [
        [True, True, False, False], [True, True, False, False], [True, False, False, False],
        [True, False, False, False], [True, True, True, False], [True, True, False, False],
        [True, False, False, False]]


def stable_sort_nucleus(probs: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """The nucleus by its definition: the whole row ranked by a stable sort, a token kept while the mass ranked
    above it is below the limit."""
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = ordered.cumsum(dim=-1) - ordered
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < limit[:, None])


def test_the_nucleus_among_the_likeliest_tokens_is_the_nucleus_among_all():
    """On the CPU only the tokens a nucleus can reach are ranked: the cut must be the one of the whole row, ties
    included, whatever number of tokens is ranked (it is the batch's largest need)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(48, 300, generator=gen) * torch.linspace(0.2, 10, 48)[:, None]  # flat to peaked rows
    logits[:8, :6] = logits[:8].max(dim=-1, keepdim=True).values  # ties among the likeliest
    logits[8:24] = (logits[8:24] / 2).round()  # ties everywhere, at the cut too
    logits[40:, 100:] = float("-inf")  # tokens a top-k or min-p removed
    probs = torch.softmax(logits, dim=-1)
    limit = torch.rand(48, generator=gen) * 0.999
    limit[::7] = float("inf")  # rows without top-p
    expected = stable_sort_nucleus(probs, limit)
    expected[limit.isinf()] = True
    for among in (1, 3, 20, 150, 299, 300):
        assert torch.equal(_nucleus(probs, limit, among), expected), among


def test_top_p_keeps_the_smallest_set_whose_probability_reaches_it():
    probs = torch.tensor([[0.1, 0.25, 0.05, 0.25, 0.2, 0.15]])
    kept = []
    for top_p in (1e-320, 0.2, 0.3, 0.65):
        scores = torch.log(probs / 0.25)
        _filter(scores, [0], [top_p], [0])
        kept += torch.isfinite(scores).tolist()
    assert kept == [[False, True, False, False, False, False],  # 0 in float32: the most likely stays
                    [False, True, False, False, False, False],  # of two equally likely, the first id ranks first
                    [False, True, False, True, False, False],
                    [False, True, False, True, True, False]]


def test_sampling_is_greedy_at_temperature_zero_and_seeded_otherwise():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(8, temperature=0.0), SamplingParams(8, temperature=1.0), SamplingParams(8, top_k=1)]

    def draw(seed):
        gens = [random.Random(seed) for _ in params]
        return [choose(logits, params, gens).tolist() for _ in range(20)]

    first = draw(1)
    assert all(row[0] == int(logits[0].argmax()) for row in first)
    assert all(row[2] == int(logits[2].argmax()) for row in first)  # top_k 1 is greedy too
    assert draw(1) == first and [r[1] for r in draw(2)] != [r[1] for r in first]


def test_sampled_tokens_follow_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).repeat(4000, 1)  # (4000, 4): many rows, each its own generator
    gens = [random.Random(i) for i in range(4000)]
    counts = torch.bincount(choose(logits, [SamplingParams(8, temperature=1.0)] * 4000, gens), minlength=4)
    assert ((counts / 4000 - probs).abs() < 0.03).all(), counts
    top_p = choose(logits[:500], [SamplingParams(8, temperature=1.0, top_p=0.6)] * 500, gens[:500]).tolist()
    assert set(top_p) == {0, 1}  # 0.5 + 0.3 reach 0.6: the rest is never drawn


@pytest.mark.parametrize("temperature", [1e-20, 1e-40, 1e-300, 5e-324])
def test_a_temperature_just_above_zero_is_greedy(temperature):
    """logits / temperature overflows float32 below ~1e-37; the largest logit must still win, ties shared."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 2.0, 2.0, -7.0]])
    gens = [random.Random(i) for i in range(2)]
    params = [SamplingParams(8, temperature=temperature)] * 2
    draws = [choose(logits, params, gens).tolist() for _ in range(40)]
    assert all(first == 1 for first, _ in draws)
    assert {second for _, second in draws} == {1, 2}


@pytest.mark.parametrize("temperature", [1e30, 1e308])
def test_a_huge_temperature_samples_evenly_among_the_tokens_not_banned(temperature):
    """Above float32's largest, too: logits / inf would make a banned token's -inf NaN."""
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1, 0.0])).repeat(3000, 1)  # the last token banned (-inf)
    gens = [random.Random(i) for i in range(3000)]
    counts = torch.bincount(choose(logits, [SamplingParams(8, temperature=temperature)] * 3000, gens), minlength=4)
    assert ((counts[:3] / 3000 - 1 / 3).abs() < 0.04).all() and counts[3] == 0, counts


def test_a_seeded_row_samples_the_same_tokens_whatever_else_is_batched():
    """A request's tokens depend on its logits, parameters and generator only, not on the rows beside it."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(8, temperature=0.9, top_k=40), SamplingParams(8, temperature=0.0),
              SamplingParams(8, temperature=1.3, top_p=0.8), SamplingParams(8, temperature=0.7, min_p=0.05),
              SamplingParams(8, temperature=1.0), SamplingParams(8, temperature=0.5, top_k=5, top_p=0.9)]

    def draws(rows):
        gens = {i: random.Random(100 + i) for i in rows}
        picked = [choose(logits[rows], [params[i] for i in rows], [gens[i] for i in rows]).tolist() for _ in range(30)]
        return {i: [step[j] for step in picked] for j, i in enumerate(rows)}

    together = draws(list(range(6)))
    assert all(draws([i]) == {i: together[i]} for i in range(6))
    assert draws([5, 2]) == {5: together[5], 2: together[2]}


def test_logprob_entries_match_log_softmax():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 2, 3, 9])
    entries = logprob_entries(logits, targets, 3)
    expected = torch.log_softmax(logits, -1)
    for row, (entry, target) in enumerate(zip(entries, targets.tolist())):
        assert entry.token_id == target and math.isclose(entry.logprob, expected[row, target].item(), abs_tol=1e-6)
        assert [i for i, _ in entry.top] == expected[row].topk(3).indices.tolist()


class LargestDraw(random.Random):
    """A generator whose every draw is the largest value below 1 that a sampler can draw."""

    def getrandbits(self, k: int) -> int:
        return 2**k - 1


def test_the_largest_draw_takes_the_last_token_of_positive_probability():
    """u just below 1 times a row's total must stay below the total: the tokens after the last one (by id) left by
    the filters (top-k here: 0, 1 and 3), or by underflow, are never chosen."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0, -2.0], [0.0, 0.0, -200.0, -200.0, -200.0, -200.0]])
    params = [SamplingParams(8, temperature=1.0, top_k=3), SamplingParams(8, temperature=0.01)]
    assert choose(logits, params, [LargestDraw(), LargestDraw()]).tolist() == [3, 1]

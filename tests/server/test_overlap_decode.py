"""Decode steps launched before the last one's tokens are taken (`overlap_decode`, the default on CUDA, forced
here on the CPU), one at a time or several back to back (`num_scheduler_steps`, fixed or `auto`), give every
request the tokens and text it gets without: greedy and seeded sampling, requests finishing at different steps
(lengths, stop strings, end of text), requests that arrive while others decode, an abort, and requests whose steps
cannot overlap (logprobs, penalties) batched with the others."""

import threading

import pytest
import torch

from runtime import load_model
from server.config import EngineConfig
from server.detokenizer import OutputText
from server.engine import Engine
from server.metrics import Metrics
from server.multi_step import AUTO_MOST_STEPS
from server.request import Request, SamplingParams

from server_helpers import wait_for

EARLY = {  # request id -> sampling fields; these are submitted together
    "greedy": SamplingParams(20, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(35, temperature=1.0, seed=1, ignore_eos=True),
    "nucleus": SamplingParams(12, temperature=0.8, top_p=0.9, seed=2, stop=("e",)),
    "eos": SamplingParams(40, temperature=1.0, seed=3),
    "aborted": SamplingParams(200, temperature=1.0, seed=4, ignore_eos=True),
}
LATE = {  # submitted once the early ones decode
    "logprobs": SamplingParams(10, temperature=0.0, logprobs=2, ignore_eos=True),
    "penalised": SamplingParams(15, temperature=1.0, seed=5, presence_penalty=1.0, ignore_eos=True),
    "late": SamplingParams(25, temperature=1.0, seed=6, ignore_eos=True),
}


def _serve(model, tokenizer, overlap: bool,
           steps: int | None = 1) -> tuple[dict[str, tuple[list[int], str]], int, list[int]]:
    """Every request's (token ids, text), how many launches landed while the next was in flight, and the tokens
    of each output the greedy request got."""
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8, overlap_decode=overlap, num_scheduler_steps=steps),
                    Metrics(model.device))
    landings = []
    land = engine._land
    engine._land = lambda flying: landings.append(flying) or land(flying)
    results: dict[str, tuple[list[int], str]] = {}
    greedy_outputs = []
    finished = threading.Event()

    def sink(name):
        def take(out):
            if name == "greedy":
                greedy_outputs.append(out)
            ids, text = results.get(name, ([], ""))
            results[name] = (ids + out.token_ids, text + out.text)
            if out.finished and len(results) == len(EARLY) + len(LATE) and all(
                    r.status.finished for r in requests.values()):
                finished.set()
        return take

    requests = {name: Request(name, tokenizer.encode(f"the river {i}"), params, "none",
                              OutputText(tokenizer, params.stop), sink(name))
                for i, (name, params) in enumerate({**EARLY, **LATE}.items())}
    engine.start()
    try:
        engine.submit(*(requests[name] for name in EARLY))
        wait_for(lambda: len(results.get("greedy", ([], ""))[0]) >= 3, what="the early requests to decode")
        engine.submit(*(requests[name] for name in LATE))
        wait_for(lambda: len(results.get("aborted", ([], ""))[0]) >= 30, what="the request to abort to decode")
        engine.abort(requests["aborted"])
        assert finished.wait(60), "every request finishes"
    finally:
        engine.stop()
    results.pop("aborted")  # where it stopped depends on timing; that it stopped is checked above
    return results, len(landings), [len(out.token_ids) for out in greedy_outputs]


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def served(request, model_dirs, live):
    """On the CPU the overlap is forced; on CUDA it is the default, with the pinned copy and event it uses there,
    and the decode graphs."""
    model, tokenizer = load_model(model_dirs["mamba1"], device=request.param).model, live.components.tokenizer
    return request.param, {"plain": _serve(model, tokenizer, overlap=False),
                           "overlapped": _serve(model, tokenizer, overlap=True),
                           "three": _serve(model, tokenizer, overlap=True, steps=3),
                           "auto": _serve(model, tokenizer, overlap=True, steps=None)}


def test_overlapped_steps_give_the_same_tokens_and_text(served):
    _, runs = served
    (plain, plain_landings, _), (overlapped, landings, _) = runs["plain"], runs["overlapped"]
    assert plain_landings == 0 and landings > 10, "the overlapped run launched steps before landing the last"
    assert overlapped == plain
    assert len(plain["greedy"][0]) == 20 and len(plain["late"][0]) == 25


def test_steps_launched_three_at_a_time_give_the_same_tokens_and_text_in_fewer_outputs(served):
    _, runs = served
    (plain, _, plain_outputs), (stepped, launches, stepped_outputs) = runs["plain"], runs["three"]
    assert stepped == plain
    # the greedy request's 20 tokens: one an output one step at a time; three at a time, up to three an output (a
    # step that cannot overlap, as a prefill for the late requests, is one step)
    assert set(plain_outputs) == {1} and launches > 3
    assert max(stepped_outputs) == 3 and len(stepped_outputs) < len(plain_outputs), "three tokens landed together"


def test_steps_launched_as_auto_chooses_give_the_same_tokens_and_text(served):
    device, runs = served
    (plain, _, plain_outputs), (adapted, _, adapted_outputs) = runs["plain"], runs["auto"]
    assert adapted == plain
    if device == "cpu":  # a launch's steps have run by the time the host launches the next: the device (the
        # host) never waits on it, so each launch runs a step more, up to auto's ceiling
        assert max(adapted_outputs) == AUTO_MOST_STEPS and len(adapted_outputs) < len(plain_outputs)

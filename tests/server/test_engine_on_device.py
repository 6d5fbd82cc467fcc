"""Prefix caching and structured output in an engine on each device (on CUDA where there is one, with its decode
graphs and overlapped steps): a prompt that continues from a stored prefix gets the tokens it gets without the
cache, and a guided request's text is one of its choices."""

import importlib.util
import threading

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from runtime import load_model
from server.config import EngineConfig
from server.detokenizer import OutputText
from server.engine import Engine
from server.guided import Guide
from server.metrics import Metrics
from server.request import Request, SamplingParams
from server_helpers import SERVER_FLAGS, LiveServer

DOCUMENT = ("the river ran past the old mill, and the miller's daughter sat on the bank to watch the water go by. "
            "she counted the boats: one, two, three.")
QUESTIONS = [" what is the pass key?", " she counted"]
CHOICES = ["the mill", "a boat", "four"]


def _run(engine: Engine, tokenizer, prompt: str, params: SamplingParams) -> tuple[list[int], str]:
    """One request through the running engine, alone: its token ids and text."""
    done, ids, text = threading.Event(), [], []

    def sink(out):
        ids.extend(out.token_ids)
        text.append(out.text)
        if out.finished:
            done.set()

    engine.submit(Request(prompt, tokenizer.encode(prompt), params, "none", OutputText(tokenizer), sink))
    assert done.wait(60), "the request finishes"
    return ids, "".join(text)


def _serve(model, tokenizer, prefix_rows: int, guided: bool) -> tuple[list, float]:
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=4, prefill_chunk=16,
                                                   prefix_cache_slots=prefix_rows), Metrics(model.device))
    engine.start()
    try:
        greedy = SamplingParams(12, temperature=0.0, ignore_eos=True)
        results = [_run(engine, tokenizer, DOCUMENT + q, greedy) for q in QUESTIONS]
        if guided:
            choice = Guide("choice", '["the mill", "a boat", "four"]', "guided_choice")
            results.append(_run(engine, tokenizer, DOCUMENT, SamplingParams(12, temperature=1.0, seed=2, guide=choice)))
        hits = sum(sample.value for family in text_string_to_metric_families(engine.metrics.exposition().decode())
                   for sample in family.samples if sample.name == "mamba_server_prefix_cache_hits_total")
    finally:
        engine.stop()
    return results, hits


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_a_stored_prefix_and_a_grammar_on_the_device(device, model_dirs, live):
    guided = importlib.util.find_spec("xgrammar") is not None  # the GPU machine may lack it: the prefix still runs
    model, tokenizer = load_model(model_dirs["mamba1"], device=device).model, live.components.tokenizer
    (cached, hits), (plain, no_hits) = _serve(model, tokenizer, 4, guided), _serve(model, tokenizer, 0, guided)
    assert cached == plain and no_hits == 0
    assert hits >= len(tokenizer.encode(DOCUMENT)) - 16  # the second question skipped the document's chunks
    if guided:
        assert cached[-1][1] in CHOICES


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_the_server_started_on_a_bare_device_name_answers(device, model_dirs):
    # `--device cuda` names no index: the engine process must take the current device, not ask CUDA for "cuda"
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "--device", device]) as server:
        reply = httpx.post(f"{server.url}/v1/completions", timeout=120,
                           json={"prompt": DOCUMENT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 8

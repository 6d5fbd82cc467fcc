"""The engine's step-fed histogram is scraped exactly as prometheus_client's own Histogram of the same
observations would be."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import LATENCY_BUCKETS, PREFIX, VLLM_NAMES, StepHistogram

# on bounds (`le` includes them), between, below the first, past the last, and zero
OBSERVED = [0.0001, 0.00011, 0.0, 0.003, 0.0025, 7.5, 120.0, 500.0, 0.0004, 0.0004]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if not s.name.endswith("_created")}


def test_a_step_histogram_reads_as_prometheus_clients_histogram():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    step = StepHistogram("gap_seconds", "gaps", "tiny", ours)
    reference = Histogram("gap_seconds", "gaps", ["model_name"], registry=theirs,
                          buckets=LATENCY_BUCKETS).labels("tiny")
    step.observe_many(OBSERVED[:4])
    step.observe_many([])
    step.observe_many(OBSERVED[4:])
    for value in OBSERVED:
        reference.observe(value)
    scraped = samples(ours)
    assert scraped == samples(theirs)
    assert scraped[("gap_seconds_count", (("model_name", "tiny"),))] == len(OBSERVED)
    assert scraped[("gap_seconds_bucket", (("le", "0.0001"), ("model_name", "tiny")))] == 2


def test_the_series_vllm_also_has_are_scraped_under_its_names_too(client):
    """A dashboard written for vLLM reads the server: after a completion, each vLLM-named series equals this
    server's own (with vLLM's label names), and the cache usage is the share of slots held."""
    assert client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 3, "ignore_eos": True}
                       ).status_code == 200
    scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples if not s.name.endswith("_created")}
    for ours, (theirs, labels) in VLLM_NAMES.items():
        own = {(name, key): value for (name, key), value in scraped.items()
               if name.removeprefix(PREFIX + ours) in ("", "_total", "_bucket", "_count", "_sum")}
        assert own, ours
        for (name, key), value in own.items():
            renamed = (name.replace(PREFIX + ours, theirs), tuple(sorted((labels.get(k, k), v) for k, v in key)))
            assert scraped[renamed] == value, renamed
    model = (("model_name", "tiny"),)
    assert scraped[("vllm:request_success_total", (("finished_reason", "length"), *model))] >= 1
    assert scraped[("vllm:generation_tokens_total", model)] == scraped[(PREFIX + "generation_tokens_total", model)] > 0
    assert scraped[("vllm:kv_cache_usage_perc", model)] == \
        scraped[(PREFIX + "requests_running", model)] / scraped[(PREFIX + "state_slots", model)]

"""The engine's step-fed histogram is scraped exactly as prometheus_client's own Histogram of the same
observations would be."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import LATENCY_BUCKETS, StepHistogram

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

"""Prometheus metrics, each app with its own registry so several can live in one process.

Every series carries a `model_name` label (the served model's name, as vLLM labels its series), the process
collector's (`process_*`) too, so that one dashboard can tell several servers apart."""

from __future__ import annotations

import os
import resource
import threading
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

PREFIX = "mamba_server_"
MODEL_LABEL = "model_name"
# 0.1 ms … 120 s: fine enough for a sub-millisecond decode step on a small model, wide enough for a 64k prefill.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0, 120.0)

# vLLM's names for the series it also has (this server's name after PREFIX → vLLM's, and vLLM's names for labels
# where they differ): each such series is scraped under both names, so that a dashboard or an alert written for
# vLLM reads this server as it is
VLLM_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "time_to_first_token_seconds": ("vllm:time_to_first_token_seconds", {}),
    "inter_token_latency_seconds": ("vllm:inter_token_latency_seconds", {}),
    "e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds", {}),
    "request_queue_time_seconds": ("vllm:request_queue_time_seconds", {}),
    "request_prefill_time_seconds": ("vllm:request_prefill_time_seconds", {}),
    "prompt_tokens": ("vllm:prompt_tokens", {}),
    "generation_tokens": ("vllm:generation_tokens", {}),
    "prefix_cache_queries": ("vllm:prefix_cache_queries", {}),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", {}),
    "requests": ("vllm:request_success", {"finish_reason": "finished_reason"}),
    "requests_running": ("vllm:num_requests_running", {}),
    "requests_waiting": ("vllm:num_requests_waiting", {}),
}
VLLM_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # here the fraction of state slots held (a sequence's whole cache)


def resident_memory_bytes() -> float:
    """This process's resident set size (Linux /proc); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


class ResidentMemory:
    """The process's current and peak resident memory as the gauges report them. The kernel's peak (getrusage,
    in KiB on Linux) and /proc's current size are counted apart and can disagree by a few pages, so the peak
    reported is also at least every current size reported before it: a scrape never shows a peak below a
    current size."""

    def __init__(self) -> None:
        self._largest_seen = 0.0

    def current(self) -> float:
        size = resident_memory_bytes()
        self._largest_seen = max(self._largest_seen, size)
        return size

    def peak(self) -> float:
        return max(float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), self.current(),
                   self._largest_seen)


class ModelLabelled:
    """Another collector's series with the model_name label added (prometheus_client's process collectors take
    no labels of their own)."""

    def __init__(self, collector, model_name: str):
        self.collector = collector
        self.model_name = model_name

    def collect(self):
        for family in self.collector.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, MODEL_LABEL: self.model_name}) for s in family.samples]
            yield labelled


class PerModel:
    """A labelled metric whose model_name is fixed: `.labels(...)` takes the other labels only."""

    def __init__(self, metric, model_name: str):
        self._metric = metric
        self._model_name = model_name

    def labels(self, *values: str):
        return self._metric.labels(self._model_name, *values)


class StepHistogram:
    """A histogram fed an engine step's observations at once: one lock and a bisection each, where
    prometheus_client's Histogram takes two locks and scans its bounds per observation (the inter-token latency
    has one observation per generated token). A collector of the registry: it is scraped as a histogram of the
    same name and series would be (`_bucket`, `_count`, `_sum`, with model_name)."""

    def __init__(self, name: str, documentation: str, model_name: str, registry: CollectorRegistry,
                 buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self._name, self._documentation, self._model_name = name, documentation, model_name
        self._bounds = [*buckets, float("inf")]
        self._counts = [0] * len(self._bounds)  # observations in each bucket alone (cumulated when scraped)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        with self._lock:
            for value in values:
                self._counts[bisect_left(self._bounds, value)] += 1  # the first bound ≥ value, as `le` reads
                self._sum += value

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self._name, self._documentation, labels=[MODEL_LABEL])
        family.add_metric([self._model_name], [(floatToGoString(bound), float(count))
                                               for bound, count in zip(self._bounds, accumulate(counts))], total)
        yield family


class VllmNamed:
    """The series of `collectors` (by their names after PREFIX) again under VLLM_NAMES, and vLLM's cache usage."""

    def __init__(self, collectors: dict, model_name: str):
        self.collectors = collectors
        self.model_name = model_name

    def collect(self):
        values = {}  # the running requests' and slots' gauges, for the cache usage
        for name, collector in self.collectors.items():
            for family in collector.collect():
                if name in ("requests_running", "state_slots"):
                    values[name] = family.samples[0].value
                if name not in VLLM_NAMES:
                    continue
                vllm_name, labels = VLLM_NAMES[name]
                renamed = Metric(vllm_name, family.documentation, family.type, family.unit)
                renamed.samples = [s._replace(name=vllm_name + s.name.removeprefix(family.name),  # _total, _bucket…
                                              labels={labels.get(k, k): v for k, v in s.labels.items()})
                                   for s in family.samples]
                yield renamed
        usage = GaugeMetricFamily(VLLM_CACHE_USAGE, "Fraction of the state slots held by requests",
                                  labels=[MODEL_LABEL])
        usage.add_metric([self.model_name], values["requests_running"] / max(values["state_slots"], 1.0))
        yield usage


class Metrics:
    def __init__(self, device: torch.device, model_name: str = "mamba"):
        self.registry = CollectorRegistry()
        registry = self.registry
        named: dict = {}  # name after PREFIX → the metric over every label, for VllmNamed

        def per_model(kind, name: str, doc: str, labels: tuple[str, ...] = (), **options):
            metric = named[name] = kind(PREFIX + name, doc, (MODEL_LABEL, *labels), registry=registry, **options)
            return PerModel(metric, model_name) if labels else metric.labels(model_name)

        def histogram(name: str, doc: str, labels: tuple[str, ...] = ()):
            return per_model(Histogram, name, doc, labels, buckets=LATENCY_BUCKETS)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first generated token")
        self.inter_token_latency = named["inter_token_latency_seconds"] = StepHistogram(
            PREFIX + "inter_token_latency_seconds", "Between consecutive tokens of a request", model_name, registry)
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to admission into a state slot")
        self.prefill_time = histogram("request_prefill_time_seconds", "Admission to the end of the prompt's prefill")
        self.step_time = histogram("engine_step_seconds", "One engine step's model work, by kind", ("kind",))
        self.prompt_tokens = per_model(Counter, "prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = per_model(Counter, "generation_tokens", "Tokens generated")
        self.prefix_cache_queries = per_model(Counter, "prefix_cache_queries",
                                              "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = per_model(Counter, "prefix_cache_hits",
                                           "Prompt tokens a stored prefix state covered (not prefilled)")
        self.requests = per_model(Counter, "requests", "Finished requests by finish reason", ("finish_reason",))
        self.scale_buckets = per_model(Counter, "scale_bucket_requests", "Finished requests by the scale bucket used",
                                       ("bucket",))
        self.running = per_model(Gauge, "requests_running", "Requests holding a state slot")
        self.waiting = per_model(Gauge, "requests_waiting", "Requests waiting for a slot")
        self.slots = per_model(Gauge, "state_slots", "State slots: sequences decoded together")
        self.slot_bytes = per_model(Gauge, "state_slot_bytes", "Bytes of one sequence's recurrent state")
        per_model(Gauge, "peak_accelerator_memory_bytes", "torch.cuda.max_memory_allocated (0 on CPU)").set_function(
            lambda: float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0)
        memory = ResidentMemory()
        per_model(Gauge, "process_resident_memory_bytes", "Resident set size of the engine process").set_function(
            memory.current)
        per_model(Gauge, "peak_resident_memory_bytes", "Largest resident set size the engine process has had"
                  ).set_function(memory.peak)
        registry.register(ModelLabelled(ProcessCollector(registry=None), model_name))
        registry.register(VllmNamed(named, model_name))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics (DESIGN §5), each app with its own registry so several can live in one process."""

from __future__ import annotations

import os

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "mamba_server_"
# 0.1 ms … 120 s: fine enough for a sub-millisecond decode step on a small model, wide enough for a 64k prefill.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0, 120.0)


def resident_memory_bytes() -> float:
    """This process's resident set size (Linux /proc); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Metrics:
    def __init__(self, device: torch.device):
        self.registry = CollectorRegistry()

        def histogram(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=LATENCY_BUCKETS)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first generated token")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Between consecutive tokens of a request")
        self.e2e_latency = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to admission into a state slot")
        self.prefill_time = histogram("request_prefill_time_seconds", "Admission to the end of the prompt's prefill")
        self.step_time = histogram("engine_step_seconds", "One engine step's model work, by kind", ("kind",))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter(PREFIX + "requests", "Finished requests by finish reason", ("finish_reason",),
                                registry=self.registry)
        self.scale_buckets = Counter(PREFIX + "scale_bucket_requests", "Finished requests by the scale bucket used",
                                     ("bucket",), registry=self.registry)
        self.running = Gauge(PREFIX + "requests_running", "Requests holding a state slot", registry=self.registry)
        self.waiting = Gauge(PREFIX + "requests_waiting", "Requests waiting for a slot", registry=self.registry)
        peak = Gauge(PREFIX + "peak_accelerator_memory_bytes", "torch.cuda.max_memory_allocated (0 on CPU)",
                     registry=self.registry)
        peak.set_function(lambda: float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0)
        rss = Gauge(PREFIX + "process_resident_memory_bytes", "Resident set size of the server process",
                    registry=self.registry)
        rss.set_function(resident_memory_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

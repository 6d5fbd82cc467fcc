"""A real Prometheus scrapes the live server (where a `prometheus` binary is found: on PATH or at $PROMETHEUS;
skipped otherwise, and the text-format parser's check in test_engine_behaviour stands): process, latency,
throughput and peak-memory series arrive, each labelled with the model."""

import os
import shutil
import subprocess
import time

import httpx
import pytest

from server_helpers import free_port

WANTED = ("process_cpu_seconds_total", "mamba_server_time_to_first_token_seconds_count",
          "mamba_server_generation_tokens_total", "mamba_server_peak_resident_memory_bytes")


@pytest.fixture
def prometheus(live, tmp_path):
    binary = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (PATH or $PROMETHEUS)")
    target = live.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: mamba, static_configs: [{{targets: ['{target}']}}]}}]\n")
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={url[7:]}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_real_prometheus_scrapes_every_series_with_the_model(prometheus, client):
    client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 4})
    deadline, found = time.monotonic() + 30, {}
    while time.monotonic() < deadline and len(found) < len(WANTED):
        time.sleep(0.5)
        for name in WANTED:
            try:
                result = httpx.get(f"{prometheus}/api/v1/query", params={"query": name}, timeout=5).json()
            except httpx.TransportError:  # not listening yet
                break
            if result.get("data", {}).get("result"):
                found[name] = result["data"]["result"]
    assert set(found) == set(WANTED), f"scraped only {sorted(found)}"
    assert all(series["metric"]["model_name"] == "tiny" for results in found.values() for series in results)
    peak = float(found["mamba_server_peak_resident_memory_bytes"][0]["value"][1])
    assert peak > 0

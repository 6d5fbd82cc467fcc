"""Runs `python -m MODULE ARGS` jobs a few at a time, each in its own process: a small model leaves a GPU
mostly idle, so several calibrations or evaluations side by side finish sooner than one after another."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    name: str
    module: str  # run as `python -m module`
    argv: list[str]
    log: Path  # the job's standard output and error


def run_jobs(jobs: list[Job], parallel: int) -> list[str]:
    """Runs every job, `parallel` at a time; returns the names of those that failed (non-zero exit)."""
    # Each process's PyTorch would otherwise start a thread per core for its host-side work, and `parallel` such
    # teams spinning on the same cores slow every job (torchrun sets OMP_NUM_THREADS for the same reason).
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    running: dict[str, subprocess.Popen] = {}
    failed: list[str] = []
    for job in jobs:
        while len(running) >= parallel:
            failed += _reap(running)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "w") as log:
            running[job.name] = subprocess.Popen([sys.executable, "-m", job.module, *job.argv], stdout=log,
                                                 stderr=subprocess.STDOUT, env=env)
    while running:
        failed += _reap(running)
    return failed


def _reap(running: dict[str, subprocess.Popen]) -> list[str]:
    """Waits for one running job to end; returns [its name] if it failed."""
    while True:
        for name, process in running.items():
            if process.poll() is not None:
                del running[name]
                return [name] if process.returncode != 0 else []
        time.sleep(0.5)

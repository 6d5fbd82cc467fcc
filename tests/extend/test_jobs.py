"""extend.jobs: jobs side by side, each in its own process, with a share of the cores for its host threads."""

import os

import pytest

from extend.jobs import Job, run_jobs

# a job module: writes the thread count it was given to argv[1], or exits with argv[2] when given
REPORTER = """import os, sys
open(sys.argv[1], "w").write(os.environ["OMP_NUM_THREADS"])
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""


@pytest.fixture
def reporter(tmp_path, monkeypatch):
    (tmp_path / "report_threads.py").write_text(REPORTER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return lambda name, *argv: Job(name, "report_threads", [str(tmp_path / name), *argv], tmp_path / f"{name}.log")


def test_each_job_gets_its_share_of_the_cores_and_failures_are_named(tmp_path, monkeypatch, reporter):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    jobs = [reporter(f"job{i}") for i in range(3)]
    assert run_jobs([*jobs, reporter("broken", "3")], parallel=4) == ["broken"]
    assert [(tmp_path / f"job{i}").read_text() for i in range(3)] == ["4"] * 3


def test_a_thread_count_the_user_set_is_kept(tmp_path, monkeypatch, reporter):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert run_jobs([reporter("job")], parallel=2) == []
    assert (tmp_path / "job").read_text() == "7"

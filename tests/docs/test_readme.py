"""The README as a user meets it: its CPU commands run verbatim in a fresh virtual environment made from a copy
of the working tree, its test command is the one CI runs, its links resolve, and it lists the server's metrics.

The commands the test runs are the ```bash blocks marked `<!-- readme-test: install -->` (install, then test)
and `<!-- readme-test: serve -->` (start the server, query it, stop it). The test command itself is not run
here: it would run this test again; CI runs it for real (`.ci/run`), so the test checks CI runs that text."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# The passkey the quick start's prompt hides, and the prompt's token count, as the README states them.
QUICK_START_KEY = "48213"
QUICK_START_PROMPT_TOKENS = 36


def marked_block(readme: str, name: str) -> list[str]:
    """The lines of the ```bash block right after `<!-- readme-test: NAME -->`."""
    match = re.search(rf"<!-- readme-test: {name} -->\n```bash\n(.*?)\n```", readme, re.S)
    assert match, f"README.md has no ```bash block marked <!-- readme-test: {name} -->"
    return match.group(1).splitlines()


def test_readme_test_command_is_what_ci_runs():
    install, test = marked_block(README.read_text(encoding="utf-8"), "install")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test == "python -m pytest -q" and test in ci
    [ci_install] = [line for line in ci if line.startswith("pip install")]
    assert [word for word in shlex.split(ci_install.split("||")[0]) if word != "-q"] == shlex.split(install)


def test_readme_links_resolve_and_name_no_path_of_this_machine():
    readme = README.read_text(encoding="utf-8")
    targets = {t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+://", t)}
    assert {"models/mamba-extend-default/README.md", "models/mamba-extend-default/eval/results.png",
            "bench/RESULTS.md"} <= targets
    assert [t for t in targets if not (REPO / t).exists()] == []
    for path in {str(REPO), str(Path.home()), "/tmp/", "/work/", "/opt/"}:
        assert path not in readme, f"README.md names {path}, a path of this machine"


def test_readme_lists_the_servers_metrics_with_their_types():
    exposition = Metrics(torch.device("cpu")).exposition().decode()
    # prometheus_client adds a `<name>_created` gauge beside each counter and histogram: not a metric of ours;
    # nor are its process collector's (process_*), which the README names as a group
    served = {name: kind for name, kind in re.findall(r"^# TYPE (mamba_server_\S+) (\w+)$", exposition, re.M)
              if not name.endswith("_created")}
    documented = dict(re.findall(r"^\| `(mamba_server_\w+)` \| (\w+) \|", README.read_text(encoding="utf-8"), re.M))
    assert documented == served


# --- the CPU path, verbatim, in a fresh virtual environment ----------------------------------------------------

def copy_working_tree(destination: Path) -> Path:
    """The files git would commit (tracked and untracked, without what .gitignore leaves out)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def venv_environment(venv: Path) -> dict[str, str]:
    """The environment of a shell in which `venv` is activated, nothing of this test run's Python leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def run_bash(script: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Runs `script` with `bash -e` in its own process group; returns its standard output. The test fails if
    the script leaves anything running (a background server it did not stop), which is then killed."""
    shell = subprocess.Popen(["bash", "-e", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=timeout)
        deadline = time.monotonic() + 5  # an exited server may stay a zombie a moment before it is reaped
        while group_alive(shell.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left_running = group_alive(shell.pid)
    finally:
        if group_alive(shell.pid):
            os.killpg(shell.pid, signal.SIGKILL)
    assert shell.returncode == 0, f"{script}\nexited {shell.returncode}\n--- stdout\n{out}\n--- stderr\n{err[-4000:]}"
    assert not left_running, f"{script}\nleft processes running"
    return out


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def package_index_reachable(venv: Path, env: dict[str, str], scratch: Path) -> bool:
    probe = subprocess.run([str(venv / "bin" / "pip"), "download", "--no-deps", "--dest", str(scratch),
                            "--timeout", "15", "--retries", "1", "tqdm"], env=env, capture_output=True, timeout=120)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def json_objects(text: str) -> list[dict]:
    """The JSON objects in `text`, in order: curl prints them without a newline, between the server's access log
    lines (uvicorn writes those to standard output)."""
    decoder, objects, position = json.JSONDecoder(), [], text.find("{")
    while position >= 0:
        value, end = decoder.raw_decode(text, position)
        objects.append(value)
        position = text.find("{", end)
    return objects


# .ci/run makes a fresh venv with the README's install command (test_readme_test_command_is_what_ci_runs holds them
# to the same words) and names it here, so that CI does not install everything twice
INSTALLED_VENV = "README_INSTALLED_VENV"


@contextmanager
def venv_installed_as_the_readme_says(tmp_path: Path, repo: Path, readme: str) -> Iterator[dict[str, str]]:
    """The environment of a venv in which the README's install command ran in `repo`: CI's own (INSTALLED_VENV),
    or else a fresh one made here, removed after."""
    if installed := os.environ.get(INSTALLED_VENV):
        yield venv_environment(Path(installed))
        return
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    try:
        env = venv_environment(venv)
        if not package_index_reachable(venv, env, tmp_path / "probe"):
            pytest.skip("the package index is unreachable: pip cannot fetch what the README's install needs")
        install, _test = marked_block(readme, "install")
        run_bash(install, repo, env, timeout=300)
        yield env
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # over a GiB


@pytest.mark.slow  # pip installs into a fresh virtual environment
def test_readme_cpu_commands_run_verbatim_in_a_fresh_venv(tmp_path):
    """About two minutes: a fresh venv takes the local torch wheel and the rest from the package index (under CI,
    the serve block runs in CI's own fresh venv, which the README's install command has just made)."""
    if shutil.which("curl") is None or shutil.which("git") is None:
        pytest.skip("the README's commands need curl, and copying the working tree needs git")
    repo = copy_working_tree(tmp_path / "repo")
    readme = (repo / "README.md").read_text(encoding="utf-8")
    serve = "\n".join(marked_block(readme, "serve"))
    assert "8000" in serve
    with venv_installed_as_the_readme_says(tmp_path, repo, readme) as env:
        health, completion = json_objects(run_bash(serve.replace("8000", str(free_port())), repo, env, timeout=120))
    assert health == {"status": "ok"}
    assert completion["object"] == "text_completion" and completion["scale_bucket"] == "none"
    assert completion["choices"][0]["text"].strip() == QUICK_START_KEY and QUICK_START_KEY in serve
    assert completion["usage"]["prompt_tokens"] == QUICK_START_PROMPT_TOKENS
    assert f"({QUICK_START_PROMPT_TOKENS} prompt tokens" in readme and f"` {QUICK_START_KEY}`" in readme


def test_the_grafana_dashboard_queries_only_series_the_server_exports():
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\b((?:mamba_server|process)_\w+)\{", expr)}
    exposition = Metrics(torch.device("cpu")).exposition().decode()
    families = re.findall(r"^# TYPE (\w+) (\w+)$", exposition, re.M)  # also those with no sample yet
    exported = {name + suffix for name, kind in families
                for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))}
    assert queried and queried <= exported, queried - exported
    assert all('model_name=~"$model_name"' in expr for expr in exprs)

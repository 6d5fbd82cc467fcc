"""A real tiny model served over real HTTP on loopback: uvicorn in a background thread, one per config."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from server_helpers import SERVER_FLAGS, LiveServer, make_bank
from tokenizers_for_tests import train_tokenizer


@pytest.fixture(scope="session")
def model_dirs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """{'mamba1', 'mamba2'}: the tiny checkpoints with a 96-id tokenizer.json and a bank in <model>/bank."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = train_tokenizer(root / "tokenizer.json")
    out = {}
    for arch in ("mamba1", "mamba2"):
        out[arch] = shutil.copytree(checkpoints[arch], root / arch)
        shutil.copy(tokenizer, out[arch] / "tokenizer.json")
        make_bank(out[arch] / "bank", out[arch])
    return out


@pytest.fixture(scope="session")
def live(model_dirs) -> LiveServer:
    """The server most tests share: tiny Mamba1, bank auto-found in <model>/bank, 4 slots, 16-token chunks."""
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS]) as server:
        yield server


@pytest.fixture
def client(live) -> httpx.Client:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c

"""The clients against a real server: the tiny Mamba1 test model with its bank, served on loopback."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))  # server_helpers: the live server

from server_helpers import SERVER_FLAGS, LiveServer, make_bank  # noqa: E402
from tokenizers_for_tests import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def served_model(checkpoints, tmp_path_factory) -> Path:
    """The tiny Mamba1 checkpoint with a 96-id tokenizer.json and the server tests' bank in <model>/bank."""
    model = shutil.copytree(checkpoints["mamba1"], tmp_path_factory.mktemp("clients") / "mamba1")
    train_tokenizer(model / "tokenizer.json")
    make_bank(model / "bank", model)
    return model


@pytest.fixture(scope="session")
def live(served_model) -> LiveServer:
    with LiveServer(["--model", str(served_model), *SERVER_FLAGS]) as server:
        yield server

"""`python -m scale_bank ls|show|verify`: each command plain and --json run as a user would, in a subprocess
(each pays for importing torch); the remaining cases call the same `main` in-process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bank_helpers import full_bank

from runtime import load_model
from scale_bank import Bank, model_info
from scale_bank.cli import main

REPO = Path(__file__).resolve().parents[2]


def cli(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Runs each command line (`("ls", bank, "--json")`) as `python -m scale_bank ...`, all at once."""
    running = [(args, subprocess.Popen([sys.executable, "-m", "scale_bank", *map(str, args)], cwd=REPO, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for args in commands]
    done = []
    for args, process in running:
        out, err = process.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


@pytest.fixture
def bank(loaded, tmp_path):
    return full_bank(tmp_path / "bank", loaded["mamba1"])[0]


def test_ls(bank):
    plain, as_json = cli(("ls", bank.path), ("ls", bank.path, "--json"))
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert bank.manifest.model["fingerprint"] in lines[0] and "mamba1, 3 layers" in lines[0]
    assert lines[1].split()[:6] == ["bucket", "length", "method", "granularity", "calibrator", "chosen"]
    assert lines[3].split() == ["8k", "8192", "delta", "channel", "zo", "calibrated", "ppl", "444", "→", "12.5"]
    assert lines[7].split()[:6] == ["128k", "131072", "decimate", "none", "zo", "calibrated"]

    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert [e["bucket"] for e in data["entries"]] == bank.buckets
    assert data["model"] == bank.manifest.model


def test_show(bank):
    scales = bank.scale_set("64k")  # a_spectrum per channel and state
    as_json, plain = cli(("show", bank.path, "64k", "--json"), ("show", bank.path, "64k"))
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["entry"] == bank.entry("64k").to_json()
    assert [layer["shape"] for layer in data["layers"]] == [[64, 8]] * 3
    for layer, scale in zip(data["layers"], scales.layers, strict=True):
        assert layer["min"] == pytest.approx(scale.min().item())
        assert layer["mean"] == pytest.approx(scale.mean().item())
        assert layer["max"] == pytest.approx(scale.max().item())

    assert plain.returncode == 0, plain.stderr
    assert "a_spectrum" in plain.stdout and "channel_state" in plain.stdout
    assert f"{scales.layers[2].max().item():.4g}" in plain.stdout.splitlines()[-1]


def test_show_decimate_has_params_and_no_layers(bank, capsys):
    assert main(["show", str(bank.path), "128k", "--json"]) == 0
    decimate = json.loads(capsys.readouterr().out)
    assert decimate["layers"] == [] and decimate["entry"]["params"]["keep_last"] == 16


def test_show_unknown_bucket(bank, capsys):
    assert main(["show", str(bank.path), "3k"]) == 1
    shown = capsys.readouterr()
    assert shown.out == "" and "unknown scale bucket '3k' (known: 4k, 8k" in shown.err


def test_verify(bank, checkpoints):
    plain, as_json = cli(("verify", bank.path),  # and against the same weights in the other layout:
                         ("verify", bank.path, "--model", checkpoints["mamba1_ssm"], "--json"))
    assert plain.returncode == 0 and plain.stdout.startswith("ok: ") and "6 entries" in plain.stdout
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"ok": True, "path": str(bank.path), "model": str(checkpoints["mamba1_ssm"]),
                                          "fingerprint": bank.manifest.model["fingerprint"], "buckets": bank.buckets}


def test_verify_refuses_a_broken_bank(bank):
    path = bank.path / "8k.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    for verified in cli(("verify", bank.path), ("verify", bank.path, "--json")):
        assert verified.returncode == 1
        assert f"{path}: truncated or corrupt" in verified.stderr
    assert json.loads(verified.stdout) == {"ok": False, "error": verified.stderr.strip().removeprefix("error: ")}


def test_ls_refuses_a_broken_bank(bank, capsys):
    (bank.path / "bank.json").write_text("{")
    assert main(["ls", str(bank.path)]) == 1
    assert f"{bank.path / 'bank.json'}: bad JSON" in capsys.readouterr().err


def test_verify_refuses_another_models_bank(bank, checkpoints, capsys):
    assert main(["verify", str(bank.path), "--model", str(checkpoints["mamba2"])]) == 1
    assert "bank is for another model: bank arch = 'mamba1', model arch = 'mamba2'" in capsys.readouterr().err


def test_verify_refuses_a_model_that_does_not_load(bank, tmp_path, capsys):
    assert main(["verify", str(bank.path), "--model", str(tmp_path / "nowhere")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_verify_matches_the_quantisation(bank, checkpoints, tmp_path, capsys):
    model = str(checkpoints["mamba1"])
    assert main(["verify", str(bank.path), "--model", model, "--quantize", "int8"]) == 1
    fault = "quantization mismatch: bank calibrated on the unquantised model, this model is int8"
    assert fault in capsys.readouterr().err
    quantised = load_model(model, quantize="int8")
    Bank.create(tmp_path / "int8", model_info(quantised.config, quantised.fingerprint, quantised.quantization))
    assert main(["verify", str(tmp_path / "int8"), "--model", model, "--quantize", "int8"]) == 0
    assert main(["verify", str(tmp_path / "int8"), "--model", model]) == 1

"""Every bad checkpoint is refused with an error naming the file and the fault; nothing loads partially."""

import json
import re
import shutil

import pytest
import torch
from checkpoints import save_safetensors_copy
from safetensors.torch import load_file

from runtime import CheckpointError, load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def _with_tensors(checkpoints, tmp_path, edit):
    tensors = load_file(checkpoints["mamba1"] / "model.safetensors")
    edit(tensors)
    return save_safetensors_copy(checkpoints["mamba1"], tmp_path / "edited", tensors)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"config\.json: missing file"):
        load_model(tmp_path)


def test_missing_weights(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1"], tmp_path / "m")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights"):
        load_model(directory)


def test_missing_shard(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1"], tmp_path / "m")
    names = load_file(directory / "model.safetensors").keys()
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    index = {"weight_map": {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                            for i, n in enumerate(names)}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: missing file"):
        load_model(directory)


def test_sharded_safetensors_load(checkpoints, tmp_path):
    directory = tmp_path / "sharded"
    directory.mkdir()
    shutil.copy(checkpoints["mamba1"] / "config.json", directory)
    tensors = load_file(checkpoints["mamba1"] / "model.safetensors")
    names = sorted(tensors)
    from safetensors.torch import save_file

    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, directory / shard)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: s for s, part in shards.items() for n in part}}))
    assert load_model(directory).fingerprint == load_model(checkpoints["mamba1"]).fingerprint


@pytest.mark.parametrize("changes,fault", [
    ({"model_type": "llama"}, "unknown architecture"),
    ({"hidden_act": "gelu"}, "unsupported: hidden_act"),
])
def test_unknown_architecture_hf(checkpoints, tmp_path, changes, fault):
    directory = _copy(checkpoints["mamba1"], tmp_path / "m")
    _edit_config(directory, **changes)
    with pytest.raises(CheckpointError, match=fault):
        load_model(directory)


def test_unknown_architecture_mamba_ssm(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1_ssm"], tmp_path / "m")
    _edit_config(directory, ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(CheckpointError, match="unknown architecture: ssm_cfg.layer = 'Mamba3'"):
        load_model(directory)


def test_config_not_json(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1"], tmp_path / "m")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(directory)


def test_config_missing_field(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1_ssm"], tmp_path / "m")
    cfg = json.loads((directory / "config.json").read_text())
    del cfg["n_layer"]
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing field 'n_layer'"):
        load_model(directory)


@pytest.mark.parametrize("source, changes, fault", [
    ("mamba1", {"hidden_size": "garbage"}, "field 'hidden_size' must be a positive integer, got 'garbage'"),
    ("mamba1", {"num_hidden_layers": True}, "field 'num_hidden_layers' must be a positive integer, got True"),
    ("mamba1", {"vocab_size": -3}, "field 'vocab_size' must be a positive integer, got -3"),
    ("mamba1", {"time_step_rank": "big"}, "field 'time_step_rank' must be a positive integer or \"auto\", got 'big'"),
    ("mamba1", {"layer_norm_epsilon": "tiny"}, "field 'layer_norm_epsilon' must be a positive number"),
    ("mamba1", {"use_bias": "no"}, "field 'use_bias' must be true or false, got 'no'"),
    ("mamba1", {"training_context_length": 2.5}, "field 'training_context_length' must be a positive integer"),
    ("mamba2", {"time_step_limit": "wide"}, "field 'time_step_limit' must be a list of two numbers"),
    ("mamba1_ssm", {"ssm_cfg": {"d_state": "16"}}, "field 'ssm_cfg.d_state' must be a positive integer, got '16'"),
    ("mamba1_ssm", {"ssm_cfg": [1]}, "field 'ssm_cfg' must be an object, got [1]"),
    ("mamba1_ssm", {"rms_norm": 1}, "field 'rms_norm' must be true or false, got 1"),
])
def test_config_field_of_the_wrong_type(checkpoints, tmp_path, source, changes, fault):
    directory = _copy(checkpoints[source], tmp_path / "m")
    _edit_config(directory, **changes)
    with pytest.raises(CheckpointError, match=re.escape(f"{directory / 'config.json'}: {fault}")):
        load_model(directory)


def test_missing_tensor(checkpoints, tmp_path):
    directory = _with_tensors(checkpoints, tmp_path, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensors: layers\.1\.mixer\.D"):
        load_model(directory)


def test_extra_tensor(checkpoints, tmp_path):
    directory = _with_tensors(checkpoints, tmp_path, lambda t: t.update({"backbone.layers.9.mixer.D": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: layers\.9\.mixer\.D"):
        load_model(directory)


def test_shape_mismatch(checkpoints, tmp_path):
    directory = _with_tensors(checkpoints, tmp_path, lambda t: t.update(
        {"backbone.layers.0.mixer.A_log": torch.zeros(64, 9)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'layers\.0\.mixer\.A_log': file has \(64, 9\)"):
        load_model(directory)


def test_nan_weight(checkpoints, tmp_path):
    def poison(t):
        t["backbone.layers.2.mixer.out_proj.weight"][0, 0] = float("nan")
    directory = _with_tensors(checkpoints, tmp_path, poison)
    with pytest.raises(CheckpointError, match=r"'backbone\.layers\.2\.mixer\.out_proj\.weight' holds NaN or Inf"):
        load_model(directory)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_file(checkpoints, tmp_path, name):
    source = checkpoints["mamba1"] if name.endswith("safetensors") else checkpoints["mamba1_ssm"]
    directory = _copy(source, tmp_path / "m")
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ": unreadable"):
        load_model(directory)


class Payload:
    pass


def test_bin_that_is_not_weights_only_is_refused(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1_ssm"], tmp_path / "m")
    # An arbitrary class in the pickle: weights_only=True must refuse to import it.
    torch.save({"backbone.norm_f.weight": torch.ones(32), "payload": Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: unreadable"):
        load_model(directory)


def test_tied_head_that_differs_is_refused(checkpoints, tmp_path):
    directory = _copy(checkpoints["mamba1_ssm"], tmp_path / "m")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the embedding"):
        load_model(directory)

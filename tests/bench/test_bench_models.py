"""The benchmarks' models: the config the GPU peer is built from is the one this runtime loads, Mamba1 and
Mamba2 alike (what can be checked without a GPU or mamba_ssm), and `python -m bench.random_model` writes a
checkpoint the server loads."""

from pathlib import Path

import pytest

from bench import random_model
from bench.gpu_models import MAMBA2_SHAPES, SHAPES, VOCAB, peer_config
from runtime import MAMBA1, MAMBA2, load_model
from runtime.config import parse_config


@pytest.mark.parametrize("name, arch, d_model, n_layer", [
    ("130m", MAMBA1, 768, 24), ("1.4b", MAMBA1, 2048, 48),
    ("mamba2-780m", MAMBA2, 1536, 48), ("mamba2-2.7b", MAMBA2, 2560, 64),
])
def test_the_runtime_reads_the_peers_config_as_the_shape(name, arch, d_model, n_layer):
    assert name in SHAPES
    config, layout = parse_config(peer_config(name, conv_kernels=False), Path("config.json"))
    assert layout == "mamba_ssm"
    assert (config.arch, config.d_model, config.n_layer) == (arch, d_model, n_layer)
    assert config.vocab_size == 50280 == VOCAB  # already a multiple of 8: no padding on either side
    if arch == MAMBA2:  # mamba_ssm's Mamba2 defaults, which the peer takes too
        assert (config.d_state, config.headdim, config.ngroups, config.nheads) == (128, 64, 1, 2 * d_model // 64)


def test_the_mamba2_peer_takes_its_fused_path_only_with_the_convolution_kernels():
    for conv_kernels in (False, True):
        for name in MAMBA2_SHAPES:
            assert peer_config(name, conv_kernels)["ssm_cfg"] == {"layer": "Mamba2", "use_mem_eff_path": conv_kernels}
    assert peer_config("130m", False)["ssm_cfg"] == {}


def test_the_random_model_command_writes_a_checkpoint_the_server_loads_with_its_tokenizer(tmp_path):
    random_model.main(["--shape", "tiny", "--out", str(tmp_path / "tiny")])
    config = load_model(tmp_path / "tiny").config
    assert (config.d_model, config.n_layer, config.vocab_size) == (64, 2, 8192)
    assert (tmp_path / "tiny" / "tokenizer.json").is_file()

"""How a loaded model holds its weights on CPU, and what a load costs: the matrix products' weights input-major
with the checkpoint's values, the kernels' weights row-major; no torch._dynamo import."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from runtime import load_model


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_a_cpu_models_products_weights_are_input_major_with_the_checkpoints_values(checkpoints, arch):
    model = load_model(checkpoints[arch]).model
    saved = load_file(checkpoints[arch] / "model.safetensors")
    mixer = model.layers[0].mixer
    for name, weight in (("backbone.embeddings.weight", model.embedding.weight),
                         ("backbone.layers.0.mixer.in_proj.weight", mixer.in_proj.weight),
                         ("backbone.layers.0.mixer.out_proj.weight", mixer.out_proj.weight)):
        assert weight.stride() == (1, weight.shape[0]), name  # an (in, out) tensor seen as (out, in)
        assert torch.equal(weight, saved[name]), name
    if arch == "mamba1":  # read by pointer in the CPU kernels
        assert mixer.x_proj.weight.is_contiguous() and mixer.dt_proj.weight.is_contiguous()


def test_loading_a_model_does_not_import_torch_dynamo(checkpoints):
    """The meta-device skeleton's default initialisers would import it, slowing every start."""
    code = ("import sys; from runtime import load_model; load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoints["mamba1"])], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "False"

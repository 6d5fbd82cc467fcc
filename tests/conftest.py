import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on CPU; the choice is made when triton is first imported
    # (transformers imports it), so it is made here, before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
# A key in the environment would guard every test server (server.config reads it when --api-key is not given);
# the tests that want one set it themselves.
os.environ.pop("MAMBA_EXTEND_API_KEY", None)

from checkpoints import hf_mamba1, hf_mamba2, to_mamba_ssm_layout  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints: {'mamba1', 'mamba2'} in the Hugging Face layout and '<arch>_ssm' in mamba_ssm's."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, maker in (("mamba1", hf_mamba1), ("mamba2", hf_mamba2)):
        maker(root / name)
        out[name] = root / name
        out[name + "_ssm"] = to_mamba_ssm_layout(root / name, root / (name + "_ssm"))
    return out

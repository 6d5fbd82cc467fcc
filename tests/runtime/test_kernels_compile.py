"""The short-chunk kernels compile for a Hopper GPU (sm_90a) on any machine: Triton builds the cubin without a device,
so a kernel that only the interpreter has run (the CPU tests) cannot reach a GPU with a compile error. Each kernel
in every combination of its flags, with the dtypes the CUDA back-end hands it; and none spills registers."""

import itertools
import os
import subprocess

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # compiles

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from runtime.ops import triton_short_conv, triton_short_scan  # noqa: E402
from runtime.ops.launch_classes import SHORT_CHUNK  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
if not os.path.exists(PTXAS):
    pytest.skip("this Triton has no NVIDIA assembler", allow_module_level=True)

MAMBA1_SCAN = {"x_ptr": "*bf16", "dt_ptr": "*bf16", "dt_bias_ptr": "*fp32", "scale_ptr": "*fp32", "A_ptr": "*fp32",
               "B_ptr": "*bf16", "C_ptr": "*bf16", "D_ptr": "*fp32", "z_ptr": "*bf16", "h0_ptr": "*fp32",
               "y_ptr": "*bf16", "h_ptr": "*fp32"}
MAMBA2_SCAN = {"x_ptr": "*bf16", "delta_ptr": "*fp32", "A_ptr": "*fp32", "B_ptr": "*bf16", "C_ptr": "*bf16",
               "D_ptr": "*fp32", "h0_ptr": "*fp32", "y_ptr": "*fp32", "h_ptr": "*fp32"}
CONV = {"x_ptr": "*bf16", "state_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "scale_ptr": "*fp32",
        "y_ptr": "*bf16", "scaled_ptr": "*bf16", "new_state_ptr": "*bf16"}


@pytest.fixture(autouse=True)
def compiled_device_functions(monkeypatch):
    """Under Triton's interpreter (the CPU tests) the kernels' modules hold interpreted functions, which the compiler
    cannot call: their own JIT functions for the duration."""
    for module in (triton_short_conv, triton_short_scan):
        for name, value in vars(module).items():
            if isinstance(value, InterpretedFunction):
                monkeypatch.setattr(module, name, JITFunction(value.fn))


def _assembled(kernel, pointers: dict[str, str], constants: dict, tmp_path) -> str:
    """The kernel compiled for sm_90a, integer arguments i32; returns ptxas's report of its registers and spills."""
    jitted = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    names = jitted.arg_names
    signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
    source = ASTSource(fn=jitted, signature=signature,
                       constexprs={(names.index(n),): value for n, value in constants.items()})
    # fused multiply-adds, as a launch compiles them by default
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "enable_fp_fusion": True})
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                            capture_output=True, text=True, check=True)
    return report.stderr


@pytest.mark.parametrize("scale, gate, state", list(itertools.product([False, True], repeat=3)))
def test_the_mamba1_short_scan_compiles(scale, gate, state, tmp_path):
    report = _assembled(triton_short_scan._short_scan_kernel, MAMBA1_SCAN,
                        dict(HAS_SCALE=scale, HAS_Z=gate, HAS_H0=state, THRESHOLD=20.0,
                             BLOCK_D=triton_short_scan.BLOCK_CHANNELS, BLOCK_N=16), tmp_path)
    assert "0 bytes spill stores" in report


@pytest.mark.parametrize("state", [False, True])
def test_the_mamba2_short_scan_compiles(state, tmp_path):
    report = _assembled(triton_short_scan._mamba2_short_scan_kernel, MAMBA2_SCAN,
                        dict(HAS_H0=state, BLOCK_P=triton_short_scan.BLOCK_HEAD_CHANNELS, BLOCK_N=128), tmp_path)
    assert "0 bytes spill stores" in report


@pytest.mark.parametrize("state, bias, scale", list(itertools.product([False, True], repeat=3)))
def test_the_short_convolution_compiles(state, bias, scale, tmp_path):
    report = _assembled(triton_short_conv._short_conv_kernel, CONV,
                        dict(K=4, HAS_STATE=state, HAS_BIAS=bias, HAS_SCALE=scale,
                             BLOCK_D=triton_short_conv.BLOCK_CHANNELS, BLOCK_T=triton.next_power_of_2(SHORT_CHUNK),
                             BLOCK_K=4), tmp_path)
    assert "0 bytes spill stores" in report

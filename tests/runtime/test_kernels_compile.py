"""The short-chunk kernels compile for a Hopper GPU (sm_90a) on any machine: Triton builds the cubin without a device,
so a kernel that only the interpreter has run (the CPU tests) cannot reach a GPU with a compile error. Each kernel
in every combination of its flags, with the dtypes the CUDA back-end hands it; and none spills registers.

The compiler runs in a child process without TRITON_INTERPRET: under the interpreter (which tests/conftest.py turns on
for the CPU tests) Triton's own library functions, `tl.sum` among them, are interpreted ones that code generation
cannot call, so a compile in this process works only for kernels already in Triton's cache."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # compiles

from runtime.ops import launch_classes, triton_short_scan  # noqa: E402
from runtime.ops.launch_classes import SHORT_CHUNK  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
if not os.path.exists(PTXAS):
    pytest.skip("this Triton has no NVIDIA assembler", allow_module_level=True)

MAMBA1_SCAN = {"x_ptr": "*bf16", "dt_ptr": "*bf16", "dt_bias_ptr": "*fp32", "scale_ptr": "*fp32", "A_ptr": "*fp32",
               "B_ptr": "*bf16", "C_ptr": "*bf16", "D_ptr": "*fp32", "z_ptr": "*bf16", "h0_ptr": "*fp32",
               "lengths_ptr": "*i64", "y_ptr": "*bf16", "h_ptr": "*fp32"}
MAMBA2_SCAN = {"x_ptr": "*bf16", "delta_ptr": "*fp32", "A_ptr": "*fp32", "B_ptr": "*bf16", "C_ptr": "*bf16",
               "D_ptr": "*fp32", "h0_ptr": "*fp32", "lengths_ptr": "*i64", "y_ptr": "*fp32", "h_ptr": "*fp32"}
CONV = {"x_ptr": "*bf16", "state_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "scale_ptr": "*fp32",
        "lengths_ptr": "*i64", "y_ptr": "*bf16", "scaled_ptr": "*bf16", "new_state_ptr": "*bf16"}
FLAGS = list(itertools.product([False, True], repeat=4))


def _cases() -> dict[str, tuple[str, str, dict, dict]]:
    """Every compiled case: its name -> (module, kernel, pointer types, constexpr values)."""
    cases = {}
    for scale, gate, state, lengths in FLAGS:
        block = launch_classes.WIDE_CHANNELS if scale == gate else launch_classes.NARROW_CHANNELS  # both widths
        cases[f"mamba1-{scale}-{gate}-{state}-{lengths}"] = (
            "runtime.ops.triton_short_scan", "_short_scan_kernel", MAMBA1_SCAN,
            dict(HAS_SCALE=scale, HAS_Z=gate, HAS_H0=state, HAS_LENGTHS=lengths, THRESHOLD=20.0, BLOCK_D=block,
                 BLOCK_N=16))
    for state, lengths in itertools.product([False, True], repeat=2):
        cases[f"mamba2-{state}-{lengths}"] = (
            "runtime.ops.triton_short_scan", "_mamba2_short_scan_kernel", MAMBA2_SCAN,
            dict(HAS_H0=state, HAS_LENGTHS=lengths, BLOCK_P=triton_short_scan.BLOCK_HEAD_CHANNELS, BLOCK_N=128))
    for state, bias, scale, lengths in FLAGS:
        cases[f"conv-{state}-{bias}-{scale}-{lengths}"] = (
            "runtime.ops.triton_short_conv", "_short_conv_kernel", CONV,
            dict(K=4, HAS_STATE=state, HAS_BIAS=bias, HAS_SCALE=scale, HAS_LENGTHS=lengths, BLOCK_D=16,
                 BLOCK_T=triton.next_power_of_2(SHORT_CHUNK), BLOCK_K=4))
    return cases


# The child: compiles each case for sm_90a, integer arguments i32, fused multiply-adds (as a launch compiles them by
# default), and writes its PTX where asked
COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for module, kernel, pointers, constants, out in json.load(sys.stdin):
    jitted = getattr(importlib.import_module(module), kernel)
    names = jitted.arg_names
    signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
    source = ASTSource(fn=jitted, signature=signature,
                       constexprs={(names.index(n),): value for n, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "enable_fp_fusion": True})
    open(out, "w").write(compiled.asm["ptx"])
"""


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, Path]:
    """Every case's PTX, compiled in one child process."""
    directory = tmp_path_factory.mktemp("ptx")
    cases = _cases()
    paths = {name: directory / f"{name}.ptx" for name in cases}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(
        [[module, kernel, pointers, constants, str(paths[name])]
         for name, (module, kernel, pointers, constants) in cases.items()]),
        text=True, env=env, check=True, cwd=Path(__file__).parents[2])
    return paths


@pytest.mark.parametrize("case", list(_cases()))
def test_the_short_kernels_compile_without_spills(case, ptx, tmp_path):
    report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", str(ptx[case]), "-o", str(tmp_path / "kernel.cubin")],
                            capture_output=True, text=True, check=True).stderr
    assert "0 bytes spill stores" in report

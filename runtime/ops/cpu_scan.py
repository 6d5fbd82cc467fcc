"""The Mamba1 prefill scan on CPU as a small C kernel (cpu_scan.c), compiled with the system's C compiler at
first use and cached; `None` from `kernel()` when there is no compiler, and the PyTorch scan runs instead.

Why: the PyTorch scan (torch_ops) is bound by memory traffic over its (tokens, d, n) intermediates, which grows
with the state size: with the embedded model's d_state 48 (16 before), a 60k-token prompt's first token on a
2-core CPU took 62 s. The kernel keeps each channel's state in cache and reads every input once (15.8 s).

The shared library is cached under $XDG_CACHE_HOME/mamba-extend (default ~/.cache), keyed by the source, the
compiler command and the CPU's feature flags (`-march=native` code must not run on another processor).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_scan.c")
# -fno-trapping-math lets the exponential's clamp become a vector select.
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]


def _cpu_identity() -> str:
    """The processor's feature flags (Linux), else its platform name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mamba-extend"


@functools.cache
def kernel():
    """The compiled scan function, or None (no compiler, or it failed: logged once)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler: the CPU scan runs in PyTorch")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, _cpu_identity()]).encode()).hexdigest()[:16]
    name = f"cpu_scan-{key}.so"
    try:
        library = _cache_dir() / name  # Path.home() raises RuntimeError where there is no home
        if not library.exists():
            _compile(compiler, library)
        function = ctypes.CDLL(str(library)).mamba1_scan_f32  # CDLL releases the GIL during the call
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = error.stderr.strip() if isinstance(error, subprocess.CalledProcessError) else error
        log.warning("building %s into %s failed (the CPU scan runs in PyTorch): %s", SOURCE, name, detail)
        return None
    log.info("CPU scan kernel: %s", library)
    function.restype = None
    function.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    return function


def _compile(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True,
                       check=True)
        os.replace(built, library)  # atomic: a concurrent first use never loads a half-written file


def mamba1_scan(delta: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan through `kernel()`, which must not be None. delta, x: (b, l, d); A: (b, d, n); B, C: (b, l, n);
    h: (b, d, n) initial state. All float32 CPU tensors. Returns y (b, l, d) without the D skip and gate, and
    the last state (b, d, n)."""
    b, l, d = delta.shape
    n = A.shape[-1]
    delta, x, A, B, C = (t.contiguous() for t in (delta, x, A, B, C))
    h = h.clone(memory_format=torch.contiguous_format)
    y = torch.empty_like(delta)
    kernel()(*(t.data_ptr() for t in (delta, x, A, B, C, h, y)), b, l, d, n, torch.get_num_threads())
    return y, h

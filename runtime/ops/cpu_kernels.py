"""C kernels for the CPU (cpu_scan.c, cpu_decode.c), compiled with the system's C compiler at first use and
cached; `load` gives None when there is no compiler or the build fails, and the caller runs PyTorch instead.

The shared libraries are cached under $XDG_CACHE_HOME/mamba-extend (default ~/.cache), keyed by the source and
the headers beside it (cpu_math.h), the compiler command and the CPU's feature flags (`-march=native` code must
not run on another processor). They link libgomp.so.1 (-fopenmp), which is torch's own copy once torch is
loaded: a kernel given `torch.get_num_threads()` uses the calling thread's OpenMP team as torch's operators do,
not a second pool of threads contending with that team's spinning workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

log = logging.getLogger(__name__)

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


def load(source: Path, signatures: Mapping[str, Sequence[Any]]) -> SimpleNamespace | None:
    """The functions of the library built from `source`, named as in `signatures` (name: ctypes argument types;
    every function returns nothing), or None (no compiler, or the build failed: logged). Callers cache the
    result: each call looks at the disk."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler: %s runs in PyTorch", source.name)
        return None
    code = b"".join(path.read_bytes() for path in [source, *sorted(source.parent.glob("*.h"))])
    key = hashlib.sha256(code + " ".join([compiler, *FLAGS, _cpu_identity()]).encode()).hexdigest()
    name = f"{source.stem}-{key[:16]}.so"
    try:
        library = _cache_dir() / name  # Path.home() raises RuntimeError where there is no home
        if not library.exists():
            _compile(compiler, source, library)
        loaded = ctypes.CDLL(str(library))  # CDLL releases the GIL during calls
        functions = SimpleNamespace(**{symbol: getattr(loaded, symbol) for symbol in signatures})
    except (OSError, RuntimeError, AttributeError, subprocess.CalledProcessError) as error:
        detail = error.stderr.strip() if isinstance(error, subprocess.CalledProcessError) else error
        log.warning("building %s into %s failed (PyTorch runs instead): %s", source, name, detail)
        return None
    log.info("CPU kernels of %s: %s", source.name, library)
    for symbol, argtypes in signatures.items():
        function = getattr(functions, symbol)
        function.restype, function.argtypes = None, argtypes
    return functions


def _compile(compiler: str, source: Path, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(built), "-lm"], capture_output=True, text=True,
                       check=True)
        os.replace(built, library)  # atomic: a concurrent first use never loads a half-written file

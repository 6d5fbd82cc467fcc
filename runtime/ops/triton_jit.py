"""Triton's `jit` with a type mypy can check its callers against (Triton ships no type information).

Kernel parameters are annotated `tl.tensor` (or `tl.constexpr`): Triton reads only `constexpr` (and scalar
type names, which these are not) from a parameter's annotation.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import triton


def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)`: a kernel launched as `fn[grid](...)`, or a device function other kernels call."""
    return triton.jit(fn)

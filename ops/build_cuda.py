"""First-use JIT build of the CUDA kernels (``ops/csrc/cuda/*.cu``), only where they can run.

They are built when torch sees a CUDA device, torch itself was built with CUDA and ``nvcc`` is
found (``torch.utils.cpp_extension.CUDA_HOME``); everywhere else nothing is attempted and CUDA
tensors take the reference. ``PURECOMP_OPS`` applies as for the CPU library (``build``):
``reference`` never builds, ``auto`` warns once and falls back on a failed build, ``cpp`` raises
:class:`OpsBuildError`. The library registers ``CUDA`` kernels for the ops that the CPU library
defines, so the CPU library is loaded first. Flags: ``-O3 --fmad=false`` (the kernels also use
round-to-nearest intrinsics, so no multiply-add is ever fused).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from purecomp.errors import OpsBuildError

from . import build

logger = logging.getLogger(__name__)

LIBRARY_NAME = "purecomp_ops_cuda"
CUDA_CSRC = build.CSRC / "cuda"


_state = build.BuildState()


def sources() -> list[Path]:
    """Every ``csrc/cuda/*.cu``, sorted."""
    return sorted(CUDA_CSRC.glob("*.cu"))


def cuda_cflags() -> list[str]:
    return ["-O3", "--fmad=false"]


def missing_toolchain() -> str | None:
    """Why the CUDA kernels cannot be built in this process, or None when they can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return None


def build_directory() -> Path:
    """Cache directory keyed by torch version, CUDA version, sources, CPU headers and flags."""
    digest = hashlib.sha256()
    for path in [*sources(), *build.headers()]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(cuda_cflags()).encode())
    version = f"{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    return build.cache_root() / f"ops-cuda-{version}-{digest.hexdigest()[:16]}"


def _compile_and_load() -> None:
    build.load_library(LIBRARY_NAME, build_directory(), "building purecomp CUDA kernels (first use, ~1-2 min)...",
                       sources(), extra_cflags=["-O3"], extra_cuda_cflags=cuda_cflags())


def ensure_cuda_built() -> bool:
    """Build and load the CUDA kernels once per process; True when CUDA tensors may use them."""
    if _state.available and build.mode() != "reference":
        return True
    selected = build.mode()
    if selected == "reference" or not build.ensure_built():
        return False
    if not _state.attempted:
        with _state.lock:
            if not _state.attempted:
                reason = missing_toolchain()
                try:
                    if reason is not None:
                        raise OpsBuildError(f"purecomp CUDA kernels cannot be built: {reason}")
                    _compile_and_load()
                    _state.available = True
                except Exception as error:  # nvcc missing, compile error, load error
                    _state.error = error
                    if selected == "auto":
                        logger.warning("purecomp CUDA kernels are unavailable (%s); CUDA tensors use the "
                                       "pure-torch reference.", str(error).strip().splitlines()[-1])
                finally:
                    _state.attempted = True
    if not _state.available and selected == "cpp":
        raise OpsBuildError(f"PURECOMP_OPS=cpp but the CUDA kernels are unavailable: {_state.error}") from _state.error
    return _state.available


def cuda_build_error() -> BaseException | None:
    """The exception of the failed CUDA build attempt, or None."""
    return _state.error

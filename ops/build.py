"""First-use JIT build of the C++ ops (``ops/csrc/*.cpp``) and the switch that can turn them off.

``PURECOMP_OPS`` selects the kernels: ``auto`` (default: build on first use, fall back to the
pure-torch reference with one warning if the build fails), ``cpp`` (a failed build raises
:class:`OpsBuildError`) or ``reference`` (never build, always use the reference).

The library is built with ``torch.utils.cpp_extension.load`` into
``$PURECOMP_CACHE_DIR`` (default ``~/.cache/purecomp``, or ``$XDG_CACHE_HOME/purecomp``)
``/ops-<torch version>-<hash of sources, headers and flags>``; cpp_extension's own file lock makes
concurrent first uses safe, and a changed source or torch gives a new directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from purecomp.errors import ConfigError, OpsBuildError

logger = logging.getLogger(__name__)

ENV_VAR = "PURECOMP_OPS"
MODES = ("auto", "cpp", "reference")
CSRC = Path(__file__).resolve().parent / "csrc"
LIBRARY_NAME = "purecomp_ops"


class BuildState:
    """Outcome of the one build attempt of this process (one per library)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempted = False
        self.available = False
        self.error: BaseException | None = None


_state = BuildState()

# ``PURECOMP_OPS`` is read at every call. ``os.environ.get`` encodes the key and decodes the value
# (about a microsecond); the router reads the mapping's own store instead when it can, which
# ``os.environ[...] = ...``, ``del os.environ[...]`` and ``monkeypatch.setenv`` all keep current.
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None
_FAST_VALUES = frozenset({"", "auto", "cpp"})


def _env_value() -> str | None:
    """The raw value of ``PURECOMP_OPS`` (None when unset)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if _ENV_KEY is None or type(data) is not dict:
        return environ.get(ENV_VAR)
    raw = data.get(_ENV_KEY)
    return None if raw is None else environ.decodevalue(raw)


def mode() -> str:
    """The value of ``PURECOMP_OPS`` (``auto`` when unset); raises ``ConfigError`` on anything else."""
    value = _env_value()
    value = "auto" if value is None else value.strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(ENV_VAR, f"expected one of {', '.join(MODES)}, got {value!r}")
    return value


def sources() -> list[Path]:
    """The C++ sources compiled into the library (every ``csrc/*.cpp``, sorted)."""
    return sorted(CSRC.glob("*.cpp"))


def _cpu_flags() -> list[str]:
    """Vector ISA flags matching the CPU capability torch itself dispatches to on this machine."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
        return [*isa, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def cflags() -> list[str]:
    """Compiler flags: optimized, OpenMP (``at::parallel_for``), no FMA contraction (bit-exact)."""
    return ["-O3", "-fopenmp", "-ffp-contract=off", *_cpu_flags()]


def headers() -> list[Path]:
    """The headers the sources include (every ``csrc/*.h``, sorted): part of the build key."""
    return sorted(CSRC.glob("*.h"))


def build_directory() -> Path:
    """Cache directory keyed by torch version, sources, headers and flags."""
    digest = hashlib.sha256()
    for path in [*sources(), *headers()]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(cflags()).encode())
    version = torch.__version__.replace("+", "_")
    return cache_root() / f"ops-{version}-{digest.hexdigest()[:16]}"


def cache_root() -> Path:
    """``$PURECOMP_CACHE_DIR``, else ``$XDG_CACHE_HOME/purecomp``, else ``~/.cache/purecomp``."""
    root = os.environ.get("PURECOMP_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "purecomp")
    return Path(root)


def load_library(name: str, directory: Path, announce: str, sources: list[Path], **flags: list[str]) -> None:
    """Compile ``sources`` into the extension library ``name`` in ``directory`` (unless it is
    cached there, else logging ``announce`` first) and load it; ``flags`` go to
    ``torch.utils.cpp_extension.load``."""
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{name}.so").exists():
        logger.warning(announce)
    cpp_extension.load(name=name, sources=[str(p) for p in sources], build_directory=str(directory),
                       is_python_module=False, verbose=False, **flags)


def _compile_and_load() -> None:
    """Build (if not cached) and load the library, then register its Python-side kernels."""
    load_library(LIBRARY_NAME, build_directory(), "building purecomp C++ ops (first use, ~1 min)...", sources(),
                 extra_cflags=cflags(), extra_ldflags=["-fopenmp"])
    from . import _registration  # noqa: F401  (fake kernels and vmap rules)


def ensure_built() -> bool:
    """Build and load the C++ ops once per process; True when they are usable.

    Returns False under ``PURECOMP_OPS=reference`` and after a failed build in ``auto`` mode
    (warned once); raises ``OpsBuildError`` after a failed build in ``cpp`` mode.
    """
    if _state.available:  # per-call fast path: built, and PURECOMP_OPS unset, auto or cpp
        value = _env_value()
        if value is None or value in _FAST_VALUES:
            return True
    selected = mode()
    if selected == "reference":
        return False
    if not _state.attempted:
        with _state.lock:
            if not _state.attempted:
                try:
                    _compile_and_load()
                    _state.available = True
                    _state.attempted = True
                except Exception as error:  # compiler missing, compile error, load error
                    _state.error = error
                    _state.attempted = True
                    if selected == "auto":
                        logger.warning(
                            "purecomp C++ ops are unavailable (%s: %s); using the pure-torch reference "
                            "kernels. Set PURECOMP_OPS=reference to skip the build.",
                            type(error).__name__,
                            str(error).strip().splitlines()[-1] if str(error).strip() else "",
                        )
    if not _state.available and selected == "cpp":
        raise OpsBuildError(
            f"PURECOMP_OPS=cpp but the C++ ops failed to build: {_state.error}"
        ) from _state.error
    return _state.available


def cpp_available() -> bool:
    """True when the C++ ops are built and selected (builds them on first call unless disabled)."""
    return ensure_built()


def build_error() -> BaseException | None:
    """The exception of the failed build attempt, or None (not attempted, or it succeeded)."""
    return _state.error

"""Build and load qkv's C kernels: compiled once per machine with the system C compiler,
cached by a hash of the source and flags, loaded with ctypes.

Why not a PyTorch C++ extension: those take about a minute to compile (the torch headers)
and need ninja; a plain C file with a C ABI compiles in under a second with `cc`. The
kernels take raw pointers, so the Python side checks dtypes, devices and layouts.

If there is no compiler, the CPU lacks the instructions, or QKV_NATIVE=0, `load` returns
None and callers use PyTorch's own ops: the kernels make things faster, never possible.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).parent
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


_switched_off = 0  # > 0 inside `disabled()`


@contextlib.contextmanager
def disabled():
    """Run PyTorch's ops only inside this block (benchmarks compare the two paths)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def active() -> bool:
    """False inside `disabled()`; the kernels' callers check it on every call."""
    return _switched_off == 0


class Kernel:
    """One C function of kernels/<lib>.c, built and loaded on first use. `get()` returns
    the ctypes function, or None where it is unavailable or switched off."""

    def __init__(self, lib: str, name: str, argtypes: list, restype=None):
        self.lib, self.name, self.argtypes, self.restype = lib, name, argtypes, restype
        self._fn: Any = None  # the ctypes function; None: not tried yet; False: cannot be built here

    def get(self):
        if _switched_off:
            return None
        if self._fn is None:
            lib = load(self.lib)
            if lib is None:
                self._fn = False
            else:
                fn = getattr(lib, self.name)
                fn.argtypes, fn.restype = self.argtypes, self.restype
                self._fn = fn
        return self._fn or None


def enabled() -> bool:
    """Native kernels are on unless QKV_NATIVE=0; they need an x86 CPU with AVX2 + FMA."""
    if os.environ.get("QKV_NATIVE", "1") == "0":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cache_dir() -> Path:
    root = os.environ.get("QKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "qkv"
    )
    return Path(root) / "kernels"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled `kernels/<name>.c` as a ctypes library, or None (with one warning) if
    it cannot be built here."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name) if enabled() else None
        return _loaded[name]


def _build_and_load(name: str) -> ctypes.CDLL | None:
    source = _HERE / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warnings.warn(
            f"qkv: no C compiler found, so the native '{name}' kernel is off (slower decode); install gcc to enable it",
            stacklevel=3,
        )
        return None
    # a kernel may #include its neighbours: the hash covers them all
    texts = b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.[ch]")))
    digest = hashlib.sha256(texts + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    try:
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # no writable cache (read-only home): a private directory for this process
                target = Path(tempfile.mkdtemp(prefix="qkv-kernels-")) / target.name
            _compile(cc, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(
            f"qkv: building the native '{name}' kernel failed, using PyTorch ops instead: {detail}", stacklevel=3
        )
        return None


def _compile(cc: str, source: Path, target: Path) -> None:
    """Compile into a temporary file beside the target, then rename: another process never
    sees (or loads) a half-written library."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [cc, *_FLAGS, f"-I{_HERE}", str(source), "-o", str(out)], check=True, capture_output=True, text=True
        )
        os.replace(out, target)

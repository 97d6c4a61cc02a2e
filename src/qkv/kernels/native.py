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
import stat
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


def cached_library(name: str) -> Path:
    """Where the compiled `kernels/<name>.c` is cached: named by a hash of the sources and flags."""
    # a kernel may #include its neighbours: the hash covers them all
    texts = b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.[ch]")))
    digest = hashlib.sha256(texts + " ".join(_FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.so"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled `kernels/<name>.c` as a ctypes library, or None (with one warning) if
    it cannot be built here."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(name) if enabled() else None
        return _loaded[name]


_warned_private = False  # the private-build warning is said once per process
_library_fds: list[int] = []  # descriptors the cached libraries were loaded through


def _build_and_load(name: str) -> ctypes.CDLL | None:
    """Load the cached library if it is trustworthy, building it there first if it is missing.
    A cache that cannot be written, or that holds a library someone else could have written,
    gives a build in a private temporary directory instead: loading a library runs its code."""
    source = _HERE / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warnings.warn(
            f"qkv: no C compiler found, so the native '{name}' kernel is off (slower decode); install gcc to enable it",
            stacklevel=3,
        )
        return None
    target = cached_library(name)
    try:
        if not os.path.lexists(target) and not _build_into_cache(cc, source, target):
            _warn_private(f"the kernel cache {target.parent} is not writable")
            return _build_privately(cc, source, target.name)
        fd, problem = _open_trusted(target)
        if fd is None:
            _warn_private(f"{target} is {problem}, so it is not loaded")
            return _build_privately(cc, source, target.name)
        try:
            lib = ctypes.CDLL(_fd_path(fd, target))
        except OSError:
            os.close(fd)
            raise
        # kept open: dlopen knows a library by its name, and a closed /proc/self/fd/N reused
        # for the next library would hand back this one
        _library_fds.append(fd)
        return lib
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(
            f"qkv: building the native '{name}' kernel failed, using PyTorch ops instead: {detail}", stacklevel=3
        )
        return None


def _build_into_cache(cc: str, source: Path, target: Path) -> bool:
    """Compile into a temporary directory beside the target, then rename: another process never
    sees (or loads) a half-written library. False if the cache directory cannot be written."""
    try:
        _make_private_directory(target.parent)
        tmp = tempfile.mkdtemp(dir=target.parent)  # mode 0700
    except OSError:
        return False
    try:
        out = Path(tmp) / target.name
        _compile(cc, source, out)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _make_private_directory(directory: Path) -> None:
    """Create the cache directory readable and writable by this user alone (its parents as usual)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode passes through the umask


def _open_trusted(path: Path) -> tuple[int | None, str]:
    """A read-only descriptor of `path` if it is a regular file (not a symlink) owned by this user
    and writable by no one else, else (None, what is wrong with it). The library is then loaded
    through this descriptor, so the file checked is the file loaded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return None, f"not openable as a plain file ({e.strerror})"
    st = os.fstat(fd)
    problem = (
        "not a regular file"
        if not stat.S_ISREG(st.st_mode)
        else "not owned by you"
        if st.st_uid != os.geteuid()
        else "writable by others (group or world)"
        if st.st_mode & 0o022
        else ""
    )
    if problem:
        os.close(fd)
        return None, problem
    return fd, ""


def _fd_path(fd: int, path: Path) -> str:
    """A path that names the open file itself (Linux), or the path where /proc is missing."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def _build_privately(cc: str, source: Path, filename: str) -> ctypes.CDLL:
    """Compile into a fresh temporary directory only this user can enter, load, and delete it
    (the loaded library stays mapped)."""
    with tempfile.TemporaryDirectory(prefix="qkv-kernels-") as tmp:
        out = Path(tmp) / filename
        _compile(cc, source, out)
        return ctypes.CDLL(str(out))


def _warn_private(reason: str) -> None:
    global _warned_private
    if not _warned_private:
        _warned_private = True
        warnings.warn(
            f"qkv: {reason}; building the native kernels in a private temporary directory for this process "
            f"(a slower start): set QKV_CACHE to a directory of your own",
            stacklevel=4,
        )


def _compile(cc: str, source: Path, out: Path) -> None:
    subprocess.run([cc, *_FLAGS, f"-I{_HERE}", str(source), "-o", str(out)], check=True, capture_output=True, text=True)
    os.chmod(out, 0o700)  # the compiler follows the umask; the loader accepts no group/world write

"""The native kernels' cache directory cannot be used to run someone else's code, and a cache
that cannot be written still leaves the kernels working (built privately)."""

import contextlib
import os
import stat
import subprocess
import warnings

import pytest

from qkv.kernels import native

pytestmark = pytest.mark.skipif(not native.enabled(), reason="native kernels are off on this CPU")

LIB = "decode_ops_f32"  # the smallest kernel: quick to build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """QKV_CACHE pointed at a fresh directory, nothing loaded yet in this process."""
    monkeypatch.setenv("QKV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_warned_private", False)
    return tmp_path / "cache"


def _plant(path, data=b"not a library", mode=0o664):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def test_a_fresh_cache_directory_is_private_and_its_library_is_reused(cache):
    lib = native.load(LIB)
    assert lib is not None
    assert stat.S_IMODE(os.stat(cache / "kernels").st_mode) == 0o700
    built = native.cached_library(LIB)
    assert stat.S_IMODE(os.stat(built).st_mode) & 0o022 == 0  # writable by its owner only

    native._loaded.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trusted cached library loads without a word
        assert native.load(LIB) is not None
    assert os.stat(built).st_mtime_ns == os.stat(native.cached_library(LIB)).st_mtime_ns  # not rebuilt


def test_a_planted_group_writable_library_is_not_loaded(cache):
    planted = native.cached_library(LIB)
    _plant(planted)
    with pytest.warns(UserWarning, match="writable by others") as record:
        lib = native.load(LIB)
    assert lib is not None  # built privately instead: loading the plant would have failed
    assert len(record) == 1
    assert planted.read_bytes() == b"not a library"  # left as it was, for its owner to look at


def test_a_library_owned_by_another_user_is_not_loaded(cache):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    planted = native.cached_library(LIB)
    _plant(planted, mode=0o644)
    os.chown(planted, 65534, 65534)
    with pytest.warns(UserWarning, match="not owned by you"):
        assert native.load(LIB) is not None


def test_a_symlink_in_the_cache_is_not_followed(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere.so"
    _plant(elsewhere, mode=0o644)
    native.cached_library(LIB).parent.mkdir(parents=True)
    native.cached_library(LIB).symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="not loaded"):
        assert native.load(LIB) is not None


@contextlib.contextmanager
def _read_only(directory):
    """`directory` made read-only; root ignores permission bits, so there it is made immutable."""
    os.chmod(directory, 0o500)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        os.chmod(directory, 0o700)
        pytest.skip("running as root where `chattr +i` is unavailable: a directory cannot be made read-only")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        os.chmod(directory, 0o700)


def test_a_read_only_cache_directory_still_gives_working_kernels(cache):
    (cache / "kernels").mkdir(parents=True)
    with _read_only(cache / "kernels"):
        with pytest.warns(UserWarning, match="not writable"):
            lib = native.load(LIB)
        assert lib is not None
        assert not native.cached_library(LIB).exists()  # built elsewhere
        assert list((cache / "kernels").iterdir()) == []


def test_the_private_build_warns_once_per_process(cache):
    for name in ("decode_ops_f32", "linear_f32"):
        _plant(native.cached_library(name))
    with pytest.warns(UserWarning) as record:
        assert native.load("decode_ops_f32") is not None
        assert native.load("linear_f32") is not None
    assert len(record) == 1

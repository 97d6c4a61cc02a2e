"""`qkv serve` sets the model up on a thread that exits, so that the engine thread's OpenMP
team is the process's only one (libgomp stops spin-waiting once it manages more threads than
CPUs, and each thread that ran a parallel op keeps its team until it exits)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from qkv.commands import serve
from qkv.serve.async_engine import on_passing_thread


def os_threads() -> set[str]:
    """The process's OS thread ids. Sets, not counts: a thread left by an earlier test may exit
    while this one runs, and a count would read that as a thread not created."""
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_a_parallel_op_on_a_passing_thread_leaves_no_threads_behind():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: torch runs no parallel team")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = os_threads()
        seen = []

        def work() -> float:
            x = torch.ones(1 << 22)
            for _ in range(20):
                x = x * 1.0001  # a parallel elementwise op: its team's helper is a new OS thread
            seen.append(os_threads())
            return float(x[0])

        assert on_passing_thread(work) == pytest.approx(1.0001**20)
        assert len(seen[0] - before) >= 2  # the passing thread and at least one team helper
        deadline = time.monotonic() + 10
        while os_threads() - before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os_threads() - before
    finally:
        torch.set_num_threads(threads)


def test_on_passing_thread_returns_and_raises_as_the_call_would():
    assert on_passing_thread(lambda: 42) == 42
    with pytest.raises(KeyError, match="missing"):
        on_passing_thread(lambda: {}["missing"])


def test_serve_builds_its_engine_on_a_thread_that_is_gone_before_serving(monkeypatch):
    where = []

    class Stop(Exception):
        pass

    def build_engine(args):
        where.append(threading.current_thread())
        raise Stop

    monkeypatch.setattr(serve, "build_engine", build_engine)
    args = serve.argparse.Namespace(host="127.0.0.1", port=0, threads=None)
    with pytest.raises(Stop):
        serve.run(args)
    assert where[0] is not threading.main_thread() and not where[0].is_alive()

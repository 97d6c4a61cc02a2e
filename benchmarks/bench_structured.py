"""Structured output: what a JSON-schema constraint costs in decode speed, what it buys in
valid JSON, and how the grammar libraries compare at computing masks.

    python benchmarks/bench_structured.py                 # decode overhead + valid-JSON rate (SmolLM2)
    python benchmarks/bench_structured.py --only rate     # the valid-JSON rate alone (through `qkv serve`)
    python benchmarks/bench_structured.py --libraries     # mask time: llguidance vs xgrammar vs outlines-core
    python benchmarks/bench_structured.py --libs-path DIR # where xgrammar / outlines-core are installed
                                                          # (pip install --target DIR --no-deps ...)

Decode: the same prompt(s), max_tokens tokens each, once free (ignore_eos) and once under
a schema that cannot end before max_tokens (an array of at least that many integers), so
both runs produce the same number of tokens; runs alternate (noisy machine) and only the
ratio of medians is reported, with the share of the constrained step spent on masks.
Valid-JSON rate: N prompts asking for a person as JSON, greedy, sent by the official openai
client to `qkv serve` (a subprocess), unconstrained vs response_format json_schema; each
reply validated with jsonschema.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# bench_serve (its server launcher) and the tests' helpers (a free port)
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]

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
    # each round's constrained run over the free run just before it: the spread shows the noise
    paired = sorted(c / f for c, f in zip(times["json_schema"], times["free"]))
    return {
        "batch": batch,
        "tokens_per_request": max_tokens,
        "rounds": rounds,
        "free_tok_s_median": round(batch * max_tokens / statistics.median(times["free"]), 1),
        "constrained_over_free_time": round(ratio, 3),
        "paired_ratio_min_median_max": [round(paired[0], 3), round(statistics.median(paired), 3), round(paired[-1], 3)],
        "overhead_pct": round(100 * (ratio - 1), 1),
        "constrained_over_free_cpu": round(statistics.median(cpu["json_schema"]) / statistics.median(cpu["free"]), 3),
        "mask_share_of_constrained_time": round(statistics.median(masks), 3),
    }


def person_prompts(n: int) -> list[str]:
    return [
        f"Write a JSON object for a person named {NAMES[i % len(NAMES)]}, aged {20 + i}, living in "
        f"{CITIES[i % len(CITIES)]}, with fields name, age, city and hobbies (a list). Only the JSON."
        for i in range(n)
    ]


def check_reply(text: str) -> str:
    """'valid' (parses and matches PERSON), 'json' (parses, wrong shape) or 'invalid'. A
    markdown code fence around the JSON is forgiven: small chat models add one."""
    import jsonschema

    text = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return "invalid"
    try:
        jsonschema.validate(doc, PERSON)
    except jsonschema.ValidationError:
        return "json"
    return "valid"


def valid_json_rate(
    model: str, n: int, max_tokens: int, concurrency: int, threads: int, replies_path: str | None = None
) -> dict:
    """N prompts through `qkv serve` (a subprocess) and the official openai client, greedy,
    once free and once with response_format json_schema; each reply checked with jsonschema."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from _serve_helpers import free_port
    from bench_serve import start_server

    port = free_port()
    proc = start_server(model, "m", port, concurrency, threads)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=600)
    formats = {
        "unconstrained": None,
        "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    }
    res = {}
    try:
        for name, fmt in formats.items():

            def ask(prompt: str, fmt=fmt):
                extra = {} if fmt is None else {"response_format": fmt}
                r = client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                    **extra,
                )
                return r.choices[0].message.content or "", r.choices[0].finish_reason

            t = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                replies = list(pool.map(ask, person_prompts(n)))
            verdicts = [check_reply(text) for text, _ in replies]
            if replies_path:
                with open(replies_path, "a", encoding="utf-8") as f:
                    for (text, finish), v in zip(replies, verdicts):
                        f.write(json.dumps({"format": name, "verdict": v, "finish": finish, "text": text}) + "\n")
            res[name] = {
                "valid": f"{verdicts.count('valid')}/{n}",
                "parses_as_json": f"{n - verdicts.count('invalid')}/{n}",
                "finish_length": sum(f == "length" for _, f in replies),
                "wall_s": round(time.perf_counter() - t, 1),
                "example": replies[0][0][:200],
            }
            print(json.dumps({name: res[name]}), flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
    ap.add_argument("--only", choices=["overhead", "rate"], default=None, help="run one of the two measurements")
    ap.add_argument("--model", default="smollm2", help="model for the valid-JSON rate (a path or a known name)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request in the overhead runs")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--rate-max-tokens", type=int, default=96, help="max_tokens of each valid-JSON request")
    ap.add_argument("--concurrency", type=int, default=16, help="client threads for the valid-JSON rate")
    ap.add_argument("--replies", default=None, metavar="FILE", help="append every reply of the rate run (JSON lines)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.libs_path:
        sys.path.append(args.libs_path)

    import qkv.interop
    from qkv.interop.gguf import open_gguf, tokenizer_from_gguf
    from qkv.interop.registry import resolve_model

    if args.libraries:
        smol = resolve_model("smollm2")
        tok = tokenizer_from_gguf(open_gguf(smol), smol)
        for r in mask_times(tok, "SmolLM2", _texts_and_ids(tok, PERSON)):
            print(json.dumps(r), flush=True)
        if args.gemma:
            path = resolve_model("gemma3-270m")
            gtok = tokenizer_from_gguf(open_gguf(path), path)
            for r in mask_times(gtok, "Gemma 3", _texts_and_ids(gtok, PERSON)):
                print(json.dumps(r), flush=True)
        return

    if args.only in (None, "overhead"):
        from qkv.infer.engine import Engine

        model, tok = qkv.interop.load(str(resolve_model("smollm2")))
        engine = Engine(model, tok, max_num_seqs=16, max_batch_tokens=1024)
        for batch in (1, 16):
            print(json.dumps(decode_overhead(engine, tok, batch, args.max_tokens, args.rounds)), flush=True)
        del engine, model
    if args.only in (None, "rate"):
        rate = valid_json_rate(
            str(resolve_model(args.model)),
            args.prompts,
            args.rate_max_tokens,
            args.concurrency,
            args.threads,
            args.replies,
        )
        print(json.dumps({"valid_json": rate}), flush=True)


if __name__ == "__main__":
    main()

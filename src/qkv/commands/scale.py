"""Scaling laws and MoE: fit L(N, D), run IsoFLOP sweeps, the MoE study, compute-optimal allocation.

Subcommands: `fit RUNS.csv|DIR` (Chinchilla Approach 3 with bootstrap intervals, Approach 2,
plots); `sweep` (train an IsoFLOP grid of small models, resumable, then fit); `moe-study`
(parameters of real MoE configs, dense vs MoE, expert load with and without balancing, the
router z-loss); `optimal --budget C` (N*, D* and tokens per parameter for a FLOP budget).
Each has its own --help.
"""

from __future__ import annotations

import argparse


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="scale_cmd", metavar="SUBCOMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    f = sub.add_parser("fit", help="fit L = E + A/N^a + B/D^b to a runs table", formatter_class=fmt)
    f.add_argument("runs", help="CSV with N, D and loss columns (or a sweep directory holding runs.csv)")
    f.add_argument("--out", default=None, help="where fit.json, report.md and the PNGs go; None: next to the CSV")
    f.add_argument(
        "--n-column",
        action="append",
        default=None,
        help="parameter column(s) to fit (repeatable); None: N and N_nonembed when present",
    )
    f.add_argument("--where", action="append", default=[], metavar="COL=VALUE", help="keep only rows with COL == VALUE")
    f.add_argument("--boot", type=int, default=100, help="bootstrap refits for 95%% intervals (0: none)")
    f.add_argument(
        "--starts",
        type=int,
        default=32,
        help="L-BFGS-B runs from this many best points of the 4,500-point grid (0: all of them)",
    )
    f.add_argument("--budget", type=_floats, default=[], help="also report the allocation at these FLOP budgets")

    s = sub.add_parser("sweep", help="train an IsoFLOP grid of small models, then fit", formatter_class=fmt)
    _sweep_args(s)
    s.add_argument("--boot", type=int, default=100, help="bootstrap refits in the fit")
    s.add_argument("--report", default=None, help="write the Markdown report here; None: OUT/report.md")
    s.add_argument("--figures", default=None, help="write the figures here; None: OUT")
    s.add_argument("--fit-only", action="store_true", help="do not train; fit what runs.csv holds")
    s.add_argument("--dry-run", action="store_true", help="print the plan and exit")

    m = sub.add_parser(
        "moe-study", help="the MoE study: params of real configs, dense vs MoE, routing", formatter_class=fmt
    )
    from qkv.scaling.moe_study import MoEStudyConfig, add_study_arguments

    add_study_arguments(m, MoEStudyConfig())

    o = sub.add_parser("optimal", help="compute-optimal N and D for a FLOP budget", formatter_class=fmt)
    o.add_argument("--budget", type=_floats, required=True, help="FLOPs, e.g. 5.76e23 (comma-separated for several)")
    o.add_argument("--fit", default=None, help="use the law in this fit.json (from `qkv scale fit`) instead of --E ...")
    o.add_argument("--n-column", default="N", help="which fit in fit.json")
    from qkv.scaling.optimal import DEFAULT_LAW

    for k, v in DEFAULT_LAW.to_dict().items():
        o.add_argument(f"--{k}", type=float, default=v, help=f"law parameter {k} (Epoch AI's refit)")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    from qkv.scaling.sweep import SweepConfig

    d = SweepConfig()
    p.add_argument("--out", default=d.out_dir, help="sweep directory (runs.csv, runs/, report)")
    p.add_argument("--data", default=d.data_dir, help="prepared data dir; prepared from the bundled corpus if missing")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocab when the sweep prepares its own data")
    p.add_argument("--budgets", type=_floats, default=d.budgets, help="FLOP budgets, comma-separated")
    p.add_argument("--sizes", type=_strs, default=d.sizes, help="model sizes LAYERSxWIDTH, comma-separated")
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--moe", action="store_true", help="also train MoE variants at equal active parameters")
    p.add_argument("--no-dense", action="store_true", help="only the MoE variants")
    p.add_argument("--n-expert", type=int, default=d.n_expert)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-steps", type=int, default=d.min_steps)
    p.add_argument("--eval-steps", type=int, default=d.eval_steps)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's own choice)")
    p.add_argument("--seed", type=int, default=d.seed)


def run(args) -> int:
    return {"fit": _fit, "sweep": _sweep, "moe-study": _moe, "optimal": _optimal}[args.scale_cmd](args)


def _fit(args) -> int:
    from pathlib import Path

    from qkv.io import atomic_write_text
    from qkv.scaling.report import fit_table, markdown
    from qkv.scaling.runs import resolve_path

    src = resolve_path(args.runs)
    out = Path(args.out) if args.out else src.parent / "fit"
    where = {}
    for w in args.where:
        if "=" not in w:
            raise ValueError(f"--where {w!r} must look like COL=VALUE (e.g. kind=dense)")
        k, v = w.split("=", 1)
        where[k] = v
    summary = fit_table(
        src,
        out,
        n_columns=args.n_column,
        where=where or None,
        n_boot=args.boot,
        n_starts=args.starts or None,
        budgets=tuple(args.budget),
    )
    atomic_write_text(out / "report.md", f"# Scaling-law fit of {src}\n\n" + markdown(summary))
    print(f"wrote {out / 'report.md'}, {out / 'fit.json'} and figures")
    return 0


def _sweep_config(args):
    from qkv.scaling.sweep import SweepConfig

    return SweepConfig(
        out_dir=args.out,
        data_dir=args.data,
        vocab_size=args.vocab_size,
        budgets=args.budgets,
        sizes=args.sizes,
        head_dim=args.head_dim,
        moe=args.moe,
        dense=not args.no_dense,
        n_expert=args.n_expert,
        top_k=args.top_k,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        min_steps=args.min_steps,
        eval_steps=args.eval_steps,
        threads=args.threads,
        seed=args.seed,
    )


def _sweep(args) -> int:
    from qkv.scaling.sweep import ensure_data, plan, report, run_sweep

    cfg = _sweep_config(args)
    if args.dry_run:
        runs, skipped = plan(cfg, int(ensure_data(cfg)["vocab_size"]))
        for r in runs:
            print(f"{r.name}: N={r.counts['N']:,} N_nonembed={r.counts['N_nonembed']:,} steps={r.steps} D={r.tokens:,}")
        for s in skipped:
            print(f"skip {s}")
        total = sum(6 * r.counts["N"] * r.tokens for r in runs)
        print(f"{len(runs)} runs, {total:.3g} FLOPs in all")
        return 0
    if not args.fit_only:
        run_sweep(cfg)
    report(cfg, out_path=args.report, figure_dir=args.figures, n_boot=args.boot)
    print(f"wrote {args.report or cfg.out_dir + '/report.md'}")
    return 0


def _moe(args) -> int:
    from qkv.scaling.moe_study import config_from_args, run_study

    run_study(config_from_args(args))
    return 0


def _fmt_count(x: float) -> str:
    for unit, k in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= k:
            return f"{x / k:.3g}{unit}"
    return f"{x:.0f}"


def _optimal(args) -> int:
    from qkv.scaling.fit import ScalingLaw
    from qkv.scaling.optimal import compute_optimal, load_law

    if args.fit:
        law = load_law(args.fit, args.n_column)
    else:
        law = ScalingLaw(E=args.E, A=args.A, B=args.B, alpha=args.alpha, beta=args.beta)
    print(
        f"law: L = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.4g} + {law.B:.4g}/D^{law.beta:.4g};  "
        f"N* ∝ C^{law.a_exponent:.3f}, D* ∝ C^{law.b_exponent:.3f}"
    )
    print(f"{'C (FLOPs)':>12} {'N*':>10} {'D*':>10} {'tokens/param':>13} {'loss':>7}")
    for c in args.budget:
        a = compute_optimal(c, law)
        n, d = _fmt_count(a.n_params), _fmt_count(a.n_tokens)
        print(f"{c:12.3g} {n:>10} {d:>10} {a.tokens_per_param:13.1f} {a.loss:7.4f}")
    return 0

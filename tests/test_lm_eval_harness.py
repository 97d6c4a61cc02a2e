"""lm-evaluation-harness scores a model served by `qkv serve` exactly as it scores the same
model loaded by transformers.

lm_eval's own `local-completions` backend (echo=true prompt logprobs for log-likelihoods,
its remote tokenizer over /tokenize, /detokenize and /tokenizer_info) runs a local
multiple-choice task and a generate-until task against a live server on loopback; its
`hf` backend runs the same tasks on the same weights exported with `qkv convert --to hf`
(the oracle). Tasks are YAML + JSONL written into tmp_path, offline.
"""

from __future__ import annotations

import json

import pytest
import torch

from _serve_helpers import BackgroundServer, make_tiny_checkpoint
from qkv.commands.serve import load_for_serving
from qkv.infer.engine import Engine
from qkv.interop.hf import export_hf
from qkv.serve.app import create_app

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install '.[test]')")

MODEL = "tiny-lm-eval"
CTX = 128

MC_TASK = """task: qkv_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """task: qkv_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(d) -> None:
    mc = [
        {"question": "The quick brown fox", "choices": [" jumps", " is red", " watches the cat", " 42"], "answer": 0},
        {"question": "To be, or not to be,", "choices": [" that", " a question", " nobler"], "answer": 1},
        {"question": "Attention lets every position", "choices": [" look back", " sleep", " count"], "answer": 0},
    ]
    gen = [{"question": "Hello! How are", "answer": " you"}, {"question": "A language model", "answer": " predicts"}]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "mc.yaml").write_text(MC_TASK.format(data=d / "mc.jsonl"))
    (d / "gen.yaml").write_text(GEN_TASK.format(data=d / "gen.jsonl"))


def test_local_completions_against_qkv_serve_matches_the_hf_backend(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import check_remote_tokenizer_support

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_for_serving(str(make_tiny_checkpoint(tmp_path / "ckpt", max_seq_len=CTX, init_std=0.08)))
    export_hf(model, tmp_path / "hf", tok)  # what `qkv convert --to hf` writes
    write_tasks(tmp_path)
    tasks = ["qkv_tiny_mc", "qkv_tiny_gen"]
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    app = create_app(Engine(model, tok, max_batch_tokens=256), MODEL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with BackgroundServer(app) as srv:
            url = srv.url + "/v1/completions"
            assert check_remote_tokenizer_support(url)  # lm_eval picks the server's own tokenizer
            served = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=dict(model=MODEL, base_url=url, tokenized_requests=True, max_length=CTX, batch_size=4),
                tasks=tasks,
                task_manager=manager,
                log_samples=True,
            )
    finally:
        torch.set_num_threads(threads)
    oracle = lm_eval.simple_evaluate(
        model="hf",
        model_args=dict(pretrained=str(tmp_path / "hf"), dtype="float32"),
        tasks=tasks,
        task_manager=manager,
        log_samples=True,
        device="cpu",
        batch_size=4,
    )

    def per_item(result, task):
        return [s["filtered_resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]

    got, want = per_item(served, "qkv_tiny_mc"), per_item(oracle, "qkv_tiny_mc")
    assert len(got) == 3
    for g, w in zip(got, want):
        assert [ll for ll, _ in g] == pytest.approx([ll for ll, _ in w], abs=1e-3)
        assert [greedy for _, greedy in g] == [greedy for _, greedy in w]
    assert served["results"]["qkv_tiny_mc"]["acc,none"] == oracle["results"]["qkv_tiny_mc"]["acc,none"]
    # greedy continuations, cut at lm_eval's stop string: the same text from both backends
    assert per_item(served, "qkv_tiny_gen") == per_item(oracle, "qkv_tiny_gen")

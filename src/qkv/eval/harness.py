"""`evaluate`: run benchmark tasks on a model and score them.

Multiple-choice tasks (tasks.py) are scored from per-choice log-likelihoods (loglik.py);
LAMBADA from the log-likelihood of each passage's last word (accuracy: the word is the
model's greedy continuation; perplexity: exp of the mean negative log-likelihood per word,
as the harness's lambada_openai reports them); GSM8K by greedy generation from the bundled
8-shot chain-of-thought prompts, cut at the stop sequences, and exact match of the final
number. Every task's result keeps its per-item log-likelihoods (or generations).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qkv.eval import data, metrics
from qkv.eval.loglik import loglikelihoods
from qkv.eval.tasks import MMLU, TASKS, Task, fewshot_prefix, load_docs, mmlu_subjects, mmlu_task

LAMBADA = "lambada"
GSM8K = "gsm8k"
ALL_TASKS = [*TASKS, MMLU, LAMBADA, GSM8K]
RANDOM_BASELINE = {**{t.name: t.random_baseline for t in TASKS.values()}, MMLU: 0.25, LAMBADA: 0.0, GSM8K: 0.0}


@dataclass
class EvalOptions:
    num_fewshot: int = 0
    limit: int | None = None  # items per task (MMLU: per subject)
    batch_size: int = 8  # questions per forward
    max_gen_tokens: int = 256  # GSM8K's generation budget per item
    seed: int = 1234  # few-shot draws
    progress: bool = True


@dataclass
class TaskResult:
    task: str
    n: int
    metrics: dict[str, float]  # acc, acc_stderr, acc_norm, ... as the task reports them
    primary: str  # the metric the CORE score centers
    shots: int
    seconds: float
    items: list[dict] = field(default_factory=list)
    subtasks: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
    if not names:
        raise ValueError(f"no tasks given; choose from {', '.join(ALL_TASKS)}")
    return names


def _progress(name: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="item", disable=not enabled, leave=False)


def _mc_items(model, tokenizer, task: Task, opts: EvalOptions, bar) -> list[dict]:
    rows = load_docs(task)
    n = len(rows) if opts.limit is None else min(opts.limit, len(rows))
    docs = [task.to_doc(r) for r in rows[:n]]
    questions = [d.requests(fewshot_prefix(task, rows, i, opts.num_fewshot, opts.seed)) for i, d in enumerate(docs)]
    scored = loglikelihoods(model, tokenizer, questions, opts.batch_size, on_question=bar.update)
    items = []
    for i, (doc, s) in enumerate(zip(docs, scored)):
        lls = [x.loglik for x in s]
        items.append(
            {
                "doc": i,
                "gold": doc.gold,
                "logliks": lls,
                "tokens": [x.n_tokens for x in s],
                "acc": metrics.acc(lls, doc.gold),
                "acc_norm": metrics.acc_norm(lls, doc.choices, doc.gold),
            }
        )
    return items


def _summarize(items: list[dict], names: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in names:
        xs = [it[m] for it in items]
        out[m] = metrics.mean(xs)
        out[f"{m}_stderr"] = metrics.stderr(xs)
    return out


def _multiple_choice(model, tokenizer, name: str, opts: EvalOptions) -> TaskResult:
    t0 = time.perf_counter()
    if name == MMLU:
        subjects = mmlu_subjects()
        per = [mmlu_task(s) for s in subjects]
        total = sum(len(load_docs(t)) if opts.limit is None else min(opts.limit, len(load_docs(t))) for t in per)
        items, subtasks = [], {}
        with _progress(name, total, opts.progress) as bar:
            for subject, task in zip(subjects, per):
                sub = _mc_items(model, tokenizer, task, opts, bar)
                subtasks[subject] = _summarize(sub, ("acc",))
                items += [{**it, "subject": subject} for it in sub]
        # the harness's mmlu group weights subjects by size: the mean over all items
        return TaskResult(
            MMLU,
            len(items),
            _summarize(items, ("acc",)),
            "acc",
            opts.num_fewshot,
            time.perf_counter() - t0,
            items,
            subtasks,
        )
    task = TASKS[name]
    rows = load_docs(task)
    total = len(rows) if opts.limit is None else min(opts.limit, len(rows))
    with _progress(name, total, opts.progress) as bar:
        items = _mc_items(model, tokenizer, task, opts, bar)
    primary = "acc_norm" if "acc_norm" in task.metrics else "acc"
    return TaskResult(
        name, len(items), _summarize(items, task.metrics), primary, opts.num_fewshot, time.perf_counter() - t0, items
    )


def _lambada(model, tokenizer, opts: EvalOptions) -> TaskResult:
    t0 = time.perf_counter()
    reqs = list(data.read_requests(LAMBADA, "bpb_0shot"))[: opts.limit]
    questions = [[(r["request"]["context"], r["request"]["continuation"])] for r in reqs]
    with _progress(LAMBADA, len(questions), opts.progress) as bar:
        scored = loglikelihoods(model, tokenizer, questions, opts.batch_size, on_question=bar.update)
    items = [
        {"doc": r["doc_id"], "loglik": s[0].loglik, "tokens": s[0].n_tokens, "acc": float(s[0].is_greedy)}
        for r, s in zip(reqs, scored)
    ]
    out = _summarize(items, ("acc",))
    lls = [it["loglik"] for it in items]
    out["perplexity"] = math.exp(-metrics.mean(lls))
    out["perplexity_stderr"] = out["perplexity"] * metrics.stderr(lls)  # first order through exp
    return TaskResult(LAMBADA, len(items), out, "acc", 0, time.perf_counter() - t0, items)


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_answer(text: str) -> str | None:
    """The final number of a chain of thought: after "the answer is" when it says so, else the
    last number; commas, a dollar sign and a trailing period dropped."""
    said = re.search(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    found = said.group(1) if said else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    found = found.replace(",", "").rstrip(".")
    return found[:-2] if found.endswith(".0") else found


def greedy_until(model, prompt: list[int], stops: list[str], max_tokens: int, tokenizer) -> str:
    """Greedy continuation of `prompt`, cut before the first stop sequence or end of text."""
    from qkv.infer.generate import generate_stream
    from qkv.infer.sampling import SamplingParams

    room = model.cfg.max_seq_len - max_tokens - 1
    prompt = prompt[-room:]
    out: list[int] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ends = tokenizer.end_ids  # eos and the model's other end tokens (end of turn, ...)
    for tok in generate_stream(model, prompt, params, eos_id=ends):
        if tok in ends:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)]
    return tokenizer.decode(out)


def _gsm8k(model, tokenizer, opts: EvalOptions) -> TaskResult:
    from qkv.infer.backend import prepare_for_inference

    prepare_for_inference(model.eval())
    t0 = time.perf_counter()
    reqs = list(data.read_requests(GSM8K, "gold_bpb_5shot"))[: opts.limit]
    items = []
    with _progress(GSM8K, len(reqs), opts.progress) as bar, torch.inference_mode():
        for r in reqs:
            req = r["request"]
            text = greedy_until(
                model,
                tokenizer.encode(req["context"], add_special=True),  # BOS as the harness: the tokenizer's default
                req["stop_sequences"],
                opts.max_gen_tokens,
                tokenizer,
            )
            answer = gsm8k_answer(text)
            items.append(
                {
                    "doc": r["doc_id"],
                    "generation": text,
                    "answer": answer,
                    "gold": r["label"],
                    "exact_match": float(answer == r["label"]),
                }
            )
            bar.update(1)
    return TaskResult(
        GSM8K, len(items), _summarize(items, ("exact_match",)), "exact_match", 8, time.perf_counter() - t0, items
    )


def evaluate_task(model, tokenizer, name: str, opts: EvalOptions) -> TaskResult:
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; qkv eval needs one to encode the prompts")
    if name == LAMBADA:
        return _lambada(model, tokenizer, opts)
    if name == GSM8K:
        return _gsm8k(model, tokenizer, opts)
    return _multiple_choice(model, tokenizer, name, opts)


def evaluate(
    model, tokenizer, tasks: list[str], opts: EvalOptions, on_task: Callable[[TaskResult], None] | None = None
) -> dict[str, TaskResult]:
    results = {}
    for name in tasks:
        results[name] = evaluate_task(model, tokenizer, name, opts)
        if on_task is not None:
            on_task(results[name])
    return results


def core_score(results: dict[str, TaskResult]) -> float:
    """CORE-style aggregate: each task's primary accuracy centered by its random baseline, averaged."""
    accs = {t: r.metrics[r.primary] for t, r in results.items()}
    return metrics.core(accs, {t: RANDOM_BASELINE[t] for t in accs})

"""Multiple-choice benchmark tasks, formatted exactly as lm-evaluation-harness formats them.

Each task turns one dataset row into a `Doc`: the text before the answer, the answer
choices and the gold index, as the harness's task YAMLs (doc_to_text / doc_to_choice /
doc_to_target) define them. A request is then (context, " " + choice): the harness's
target delimiter is one space and its few-shot delimiter a blank line. Winogrande is the
one "multiple inputs" task: its choices are contexts (the sentence up to the blank, filled
with each option) that all score one shared continuation (the rest of the sentence).

Few-shot examples come from the task's dev split where the data ships one (MMLU: its first
K rows, as the harness's `first_n` sampler takes them); otherwise, as the harness does when
a task has no training split, from the evaluated split itself, never the doc being asked,
drawn with a fixed seed per doc (so `--limit` does not change what an item sees).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from qkv.eval import data

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass
class Doc:
    """One question. `contexts` holds one shared context, or one per choice (multiple inputs)."""

    contexts: list[str]
    continuations: list[str]  # one per choice, or the one shared continuation (multiple inputs)
    gold: int
    choices: list[str]  # what the harness calls doc_to_choice (acc_norm divides by their lengths)

    @property
    def multiple_inputs(self) -> bool:
        return len(self.contexts) > 1

    def requests(self, prefix: str = "") -> list[tuple[str, str]]:
        """(context, continuation) per choice, the few-shot prefix in front of each context."""
        if self.multiple_inputs:
            return [(prefix + c, TARGET_DELIMITER + self.continuations[0]) for c in self.contexts]
        return [(prefix + self.contexts[0], TARGET_DELIMITER + c) for c in self.continuations]

    def solved(self) -> str:
        """This doc as a few-shot example: the question followed by its gold answer."""
        if self.multiple_inputs:
            return self.contexts[self.gold] + TARGET_DELIMITER + self.continuations[0]
        return self.contexts[0] + TARGET_DELIMITER + self.continuations[self.gold]


@dataclass(frozen=True)
class Task:
    name: str
    dataset: tuple[str, str, str]  # hf_datasets/<name>/<config>/<split>
    to_doc: Callable[[dict], Doc]
    metrics: tuple[str, ...]  # what the harness reports for the task, the first is the primary one
    random_baseline: float  # accuracy of chance (BoolQ: its majority class), for the centered score
    fewshot_split: str | None = None  # a split of the same dataset; None: the evaluated split
    description: Callable[[dict], str] = field(default=lambda row: "")


def _mc(context: str, choices: list[str], gold: int) -> Doc:
    return Doc([context], list(choices), gold, list(choices))


def _arc(row: dict) -> Doc:
    choices = row["choices"]
    return _mc(f"Question: {row['question']}\nAnswer:", choices["text"], choices["label"].index(row["answerKey"]))


def hellaswag_preprocess(text: str) -> str:
    """The harness's clean-up of HellaSwag text (brackets are WikiHow artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return _mc(query, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _piqa(row: dict) -> Doc:
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _winogrande(row: dict) -> Doc:
    blank = row["sentence"].index("_")
    contexts = [row["sentence"][:blank] + opt for opt in (row["option1"], row["option2"])]
    target = row["sentence"][blank + 1 :].strip()
    return Doc(contexts, [target], {"1": 0, "2": 1}[row["answer"]], contexts)


def _boolq(row: dict) -> Doc:
    return _mc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"]))


def _openbookqa(row: dict) -> Doc:
    choices = row["choices"]
    return _mc(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"].lstrip()))


def _commonsense_qa(row: dict) -> Doc:
    text = row["choices"]["text"]
    letters = ["A", "B", "C", "D", "E"]
    listed = "".join(f"\n{letter}. {t}" for letter, t in zip(letters, text))
    return _mc(f"Question: {row['question'].strip()}{listed}\nAnswer:", letters, letters.index(row["answerKey"]))


def _sciq(row: dict) -> Doc:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _mc(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def _copa(row: dict) -> Doc:
    # the harness's choices carry their own leading space, so with the target delimiter the
    # continuation starts with two spaces; kept, since published numbers were made that way
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    lower = [" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return _mc(row["premise"].strip()[:-1] + f" {connector}", lower, int(row["label"]))


def _mmlu(row: dict) -> Doc:
    c = row["choices"]
    text = f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return _mc(text, ["A", "B", "C", "D"], int(row["answer"]))


def _mmlu_description(row: dict) -> str:
    return f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("arc_easy", ("ai2_arc", "ARC-Easy", "validation"), _arc, ("acc", "acc_norm"), 0.25),
        Task("arc_challenge", ("ai2_arc", "ARC-Challenge", "validation"), _arc, ("acc", "acc_norm"), 0.25),
        Task("hellaswag", ("hellaswag", "none", "validation"), _hellaswag, ("acc", "acc_norm"), 0.25),
        Task("piqa", ("piqa", "plain_text", "validation"), _piqa, ("acc", "acc_norm"), 0.5),
        Task("winogrande", ("winogrande", "winogrande_xl", "validation"), _winogrande, ("acc",), 0.5),
        Task("boolq", ("boolq", "none", "validation"), _boolq, ("acc",), 0.62),
        Task("openbookqa", ("openbookqa", "main", "validation"), _openbookqa, ("acc", "acc_norm"), 0.25),
        Task("commonsense_qa", ("tau/commonsense_qa", "none", "validation"), _commonsense_qa, ("acc",), 0.2),
        Task("sciq", ("sciq", "none", "validation"), _sciq, ("acc", "acc_norm"), 0.25),
        Task("copa", ("super_glue", "copa", "validation"), _copa, ("acc",), 0.5),
    ]
}
MMLU = "mmlu"
MMLU_DATASET = "hails/mmlu_no_train"


def mmlu_task(subject: str) -> Task:
    """One MMLU subject: the test split, few-shot from its dev split (first K)."""
    return Task(
        f"mmlu_{subject}",
        (MMLU_DATASET, subject, "test"),
        _mmlu,
        ("acc",),
        0.25,
        fewshot_split="dev",
        description=_mmlu_description,
    )


def mmlu_subjects() -> list[str]:
    return data.list_configs(MMLU_DATASET)


def load_docs(task: Task) -> list[dict]:
    return list(data.read_split(*task.dataset))


def fewshot_prefix(task: Task, rows: list[dict], index: int, k: int, seed: int = 1234) -> str:
    """Description plus K solved examples and the few-shot delimiter, for rows[index]."""
    description = task.description(rows[index])
    if k <= 0:
        return description
    if task.fewshot_split is not None:  # a dev split: its first K rows
        pool = list(data.read_split(task.dataset[0], task.dataset[1], task.fewshot_split))[:k]
    else:  # the evaluated split, never the doc itself
        rng = random.Random(f"{seed}:{task.name}:{index}")
        picks = [i for i in rng.sample(range(len(rows)), min(k + 1, len(rows))) if i != index][:k]
        pool = [rows[i] for i in picks]
    shots = [task.to_doc(r).solved() for r in pool]
    return description + FEWSHOT_DELIMITER.join(shots) + FEWSHOT_DELIMITER

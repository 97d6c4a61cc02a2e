"""Shared command-line plumbing of the alignment verbs (sft, reward, dpo, ppo, grpo).

Every stage takes --model (a qkv checkpoint directory with a chat tokenizer), --data,
the TrainConfig options of `qkv train` (--lr, --max-steps, --batch-size, --out-dir, ...),
an optional --config file and trailing key=value overrides, and --resume.
"""

from __future__ import annotations

import argparse


def add_stage_arguments(p: argparse.ArgumentParser, data_help: str, heldout: bool = True) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="TrainConfig overrides, applied last (e.g. max_steps=100)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="starting model: qkv checkpoint dir, Hugging Face dir or .gguf file (with a chat tokenizer)",
    )
    p.add_argument("--data", required=True, help=data_help)
    if heldout:
        p.add_argument(
            "--heldout", default=None, help="held-out JSONL in the same format (evaluated during and after training)"
        )
    p.add_argument("--config", default=None, help="YAML or TOML file of TrainConfig keys")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    _add_train_options(p)


# TrainConfig fields that belong to pretraining only (the stage's model is --model)
_SKIP = {"preset", "model", "init_from", "data_dir"}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """`qkv train`'s --options for every TrainConfig field an alignment stage uses. Their help
    shows no default: a stage starts from STAGE_DEFAULTS and its own, not TrainConfig's."""
    from qkv.commands.train import add_config_arguments

    add_config_arguments(p, skip=frozenset(_SKIP), show_defaults=False)


STAGE_DEFAULTS = dict(
    lr=1e-4, warmup_steps=10, max_steps=300, batch_size=16, seq_len=256, eval_every=100, save_every=100
)


def stage_config(args: argparse.Namespace, stage: str, **defaults):
    """TrainConfig: stage defaults (out_dir runs/<stage>) <- --config <- --options <- key=value."""
    import dataclasses

    from qkv.train.config import TrainConfig, load_train_config

    base = TrainConfig(**{**STAGE_DEFAULTS, "out_dir": f"runs/{stage}", **defaults})
    names = {f.name for f in dataclasses.fields(TrainConfig)} - _SKIP
    flags = {k: v for k, v in vars(args).items() if k in names}
    cfg = load_train_config(args.config, flags, base=base)
    return load_train_config(None, args.overrides, base=cfg)


def load_policy(source: str):
    """(model in train mode, tokenizer) from a qkv checkpoint, a Hugging Face directory or a
    GGUF file (an imported model is fine-tuned as it is, no conversion step); a clear error
    without a tokenizer or a chat template."""
    from qkv.align.data import require_chat_template
    from qkv.interop import load

    model, tok = load(source, dequantize=True)  # training updates plain fp32 weights
    if tok is None:
        raise ValueError(
            f"{source}: no tokenizer found next to the weights; an alignment stage needs the model's "
            "tokenizer with a chat template (tokenizer.json + tokenizer_config.json)"
        )
    require_chat_template(tok, source)
    return model.train(), tok


def report(result, what: str) -> None:
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"{what}: step {result.step}, train loss {result.train_loss:.4f}{val}, "
        f"{result.tokens_per_s:,.0f} tokens/s; model in {result.run_dir}"
    )


def add_dataclass_arguments(p: argparse.ArgumentParser, cls) -> None:
    """One --option per field of a stage dataclass (PPOConfig, GRPOConfig), default shown."""
    import dataclasses
    import inspect
    import re

    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            notes[m.group(1)] = m.group(2).replace("%", "%%")
    d = cls()
    for f in dataclasses.fields(cls):
        default = getattr(d, f.name)
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=default, help=notes.get(f.name, " "))
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif default is None or isinstance(default, float):
            p.add_argument(flag, type=float, metavar="FLOAT", **kw)
        else:
            p.add_argument(flag, type=type(default), metavar=type(default).__name__.upper(), **kw)


def dataclass_from_args(args: argparse.Namespace, cls):
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def load_prompts_arg(path: str) -> list:
    from qkv.align.data import load_prompts

    return load_prompts(path)


def task_gold_fn():
    """The bundled task's gold judge as fn(prompt messages, response) -> float."""
    from qkv.align.task import gold_reward, prompt_text

    return lambda prompt, response: gold_reward(prompt_text(prompt), response)

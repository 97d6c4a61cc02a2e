"""Shared command-line plumbing of the alignment verbs (sft, reward, dpo, ppo, grpo).

Every stage takes --model (a qkv checkpoint directory with a chat tokenizer), --data,
the TrainConfig options of `qkv train` (--lr, --max-steps, --batch-size, --out-dir, ...),
an optional --config file and trailing key=value overrides, and --resume.
"""

from __future__ import annotations

import argparse


def add_stage_arguments(
    p: argparse.ArgumentParser, data_help: str, heldout: bool = True, epochs: bool = False, **defaults
) -> None:
    """The options every stage shares; `epochs` adds --epochs (stages that walk --data);
    `defaults`: the stage's own TrainConfig defaults beyond STAGE_DEFAULTS (shown in --help)."""
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
    if epochs:
        p.add_argument(
            "--epochs",
            type=float,
            metavar="FLOAT",
            default=0.0,
            help="passes over --data (fractions allowed); > 0 sets the run's length to "
            "ceil(epochs x examples / batch_size) steps, capped by --max-steps when that is given too; "
            "0: train for --max-steps",
        )
    _add_train_options(p, stage_base(p.prog.split()[-1], **defaults))


# TrainConfig fields that belong to pretraining only (the stage's model is --model)
_SKIP = {"preset", "model", "init_from", "data_dir"}


def _add_train_options(p: argparse.ArgumentParser, base) -> None:
    """`qkv train`'s --options for every TrainConfig field an alignment stage uses, their help
    showing the stage's defaults (STAGE_DEFAULTS and its own), not `qkv train`'s."""
    from qkv.commands.train import add_config_arguments

    add_config_arguments(p, skip=frozenset(_SKIP), defaults=base)


STAGE_DEFAULTS = dict(
    lr=1e-4, warmup_steps=10, max_steps=300, batch_size=16, seq_len=256, eval_every=100, save_every=100
)


def stage_base(stage: str, **defaults):
    """The TrainConfig a stage starts from: STAGE_DEFAULTS, out_dir runs/<stage>, its own."""
    from qkv.train.config import TrainConfig

    return TrainConfig(**{**STAGE_DEFAULTS, "out_dir": f"runs/{stage}", **defaults})


def stage_config(args: argparse.Namespace, stage: str, **defaults):
    """TrainConfig: stage defaults (out_dir runs/<stage>) <- --config <- --options <- key=value."""
    import dataclasses

    from qkv.train.config import TrainConfig, load_train_config

    base = stage_base(stage, **defaults)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - _SKIP
    flags = {k: v for k, v in vars(args).items() if k in names}
    cfg = load_train_config(args.config, flags, base=base)
    return load_train_config(None, args.overrides, base=cfg)


def max_steps_given(args: argparse.Namespace) -> bool:
    """Whether the user set max_steps (--max-steps, a key=value override or the --config file)."""
    from qkv.train.config import read_config_file

    if "max_steps" in vars(args) or any(o.split("=", 1)[0].strip() == "max_steps" for o in args.overrides):
        return True
    return bool(args.config) and "max_steps" in read_config_file(args.config)


def load_chat_tokenizer(source: str):
    """The tokenizer of a model source without reading its weights (a qkv checkpoint, Hugging
    Face directory or GGUF file), so the data can be checked before the model loads."""

    import sys

    from qkv import chat_formats
    from qkv.align.data import require_chat_template
    from qkv.interop.load import _gguf_file, detect_format
    from qkv.interop.registry import resolve_model
    from qkv.tokenizer import Tokenizer

    path = resolve_model(source)
    if detect_format(path) == "gguf":  # a clear error when source is no model
        from qkv.interop.gguf import open_gguf, tokenizer_from_gguf

        f = _gguf_file(path)
        tok = tokenizer_from_gguf(open_gguf(f), f)
    else:
        d = path if path.is_dir() else path.parent
        tok = Tokenizer.load(d) if (d / "tokenizer.json").exists() else None
    if tok is None:
        raise ValueError(
            f"{source}: no tokenizer found next to the weights; an alignment stage needs the model's "
            "tokenizer with a chat template (tokenizer.json + tokenizer_config.json)"
        )
    tok, note = chat_formats.fallback(tok)  # a known turn format for a file without a template
    if note:
        print(f"note: {note}", file=sys.stderr)
    require_chat_template(tok, source)
    return tok


def check_data(source: str, cfg, fit_fn, tokenizer, data) -> None:
    """Print the data summary at the run's window (seq_len, at most the model's context);
    one-line error when no example keeps an assistant token, a warning when some are cut."""
    import sys

    from qkv.interop.load import load_config

    limit = load_config(source).max_seq_len  # the config only: no weights are read
    fit = fit_fn(tokenizer, data, min(cfg.seq_len, limit))
    error, warning = fit.problem(limit)
    if error:
        raise ValueError(error)
    print(fit.summary())
    if warning:
        print(warning, file=sys.stderr)


def load_policy(source: str, cfg=None):
    """(model in train mode, tokenizer) from a qkv checkpoint, a Hugging Face directory or a
    GGUF file (an imported model is fine-tuned as it is, no conversion step); a clear error
    without a tokenizer or a chat template. With cfg.lora_r > 0 (a TrainConfig) the base is
    frozen, a quantized GGUF stays quantized (QLoRA), and fp32 LoRA adapters are installed."""
    from qkv import chat_formats
    from qkv.align.data import require_chat_template
    from qkv.interop import load

    lora_r = getattr(cfg, "lora_r", 0)
    # full fine-tuning updates plain fp32 weights; a frozen LoRA base keeps its GGUF blocks
    model, tok = load(source, dequantize=not lora_r)
    if lora_r:
        from qkv.lora import LoraConfig, add_lora

        lcfg = LoraConfig(r=lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
        add_lora(model, lcfg)
        model.lora_base_model = str(source)  # adapter_config.json's base_model_name_or_path
    if tok is None:
        raise ValueError(
            f"{source}: no tokenizer found next to the weights; an alignment stage needs the model's "
            "tokenizer with a chat template (tokenizer.json + tokenizer_config.json)"
        )
    tok, _ = chat_formats.fallback(tok)  # as load_chat_tokenizer, which said so
    require_chat_template(tok, source)
    return model.train(), tok


def reference_for(policy, ref_source: str | None, fallback: str):
    """The frozen reference model: --ref when given; for a LoRA policy, the policy itself with
    its adapters off (no second copy in memory); else a fresh load of `fallback`."""
    from qkv.lora import BaseView, has_lora

    if ref_source is None and has_lora(policy):
        return BaseView(policy)
    return load_policy(ref_source or fallback)[0]


def report(result, what: str) -> None:
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    made = "LoRA adapter (qkv merge folds it in)" if (result.run_dir / "adapter_config.json").exists() else "model"
    print(
        f"{what}: step {result.step}, train loss {result.train_loss:.4f}{val}, "
        f"{result.tokens_per_s:,.0f} tokens/s; {made} in {result.run_dir}"
    )
    if result.disk:
        print(disk_line(result.disk))


def disk_line(disk: dict) -> str:
    """The run directory's size on disk, in one line."""

    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f} MB"

    return (
        f"run dir on disk: {mb(disk['total'])} (weights {mb(disk['weights'])}, final weights stored once; "
        f"optimizer state {mb(disk['optimizer'])}, kept for --resume per --save-optimizer)"
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

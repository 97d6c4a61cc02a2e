"""Pretrain a model on prepared token shards (`qkv prepare` output), resumable, DDP/FSDP under torchrun.

Settings come from the defaults below, then an optional YAML/TOML --config file, then
--options and trailing key=value overrides (e.g. `max_steps=500 model.n_layer=2`).
Run distributed with `torchrun --nproc_per_node=2 -m qkv.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_config_arguments(p: argparse.ArgumentParser, skip: frozenset[str] = frozenset(), defaults=None) -> None:
    """One --option per TrainConfig field (but `skip`), its help from the field's metadata and
    its default from `defaults` (a TrainConfig; TrainConfig() when None), written into the help
    because the option's own default is SUPPRESS: unset options stay unset so that a --config
    file's values are not overridden by defaults."""
    from qkv.train.config import TrainConfig

    defaults = defaults or TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".strip()
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%") or None)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, (int, float)):
            p.add_argument(flag, type=type(default), metavar=type(default).__name__.upper(), **kw)
        elif f.name == "model":
            p.add_argument(flag, type=_yaml_dict, metavar="YAML", **kw)
        else:
            p.add_argument(flag, type=str, metavar="STR", **kw)


def _yaml_dict(s: str) -> dict:
    import yaml

    d = yaml.safe_load(s)
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"{s!r} is not a mapping like '{{n_layer: 2}}'")
    return d


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, applied last (e.g. max_steps=100 model.n_layer=2)",
    )
    p.add_argument("--config", default=None, help="YAML or TOML file of TrainConfig keys")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_config_arguments(p)


def config_from_args(args: argparse.Namespace):
    from qkv.train.config import TrainConfig, load_train_config

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    cfg = load_train_config(args.config, flags)
    return load_train_config(None, args.overrides, base=cfg)


def run(args: argparse.Namespace) -> int:
    from qkv.train import distributed as D
    from qkv.train.pretrain import make_trainer

    cfg = config_from_args(args)
    try:
        trainer = make_trainer(cfg, resume=args.resume)
        if trainer.dist.is_main:
            from qkv.model import count_params

            n = count_params(trainer.model)
            start = (
                f"resuming from {trainer.resumed_from} at step {trainer.step}"
                if trainer.resumed_from
                else "from scratch"
            )
            print(
                f"training {cfg.preset} ({n.total / 1e6:.2f}M params) for {cfg.max_steps} steps {start}; "
                f"{trainer.world} process(es) on {trainer.device}; run dir {cfg.out_dir}"
            )
        result = trainer.fit()
        if trainer.dist.is_main:
            bpb = f", val bpb {result.val_bpb:.3f}" if result.val_bpb is not None else ""
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(
                f"done: step {result.step}, train loss {result.train_loss:.4f}{val}{bpb}, "
                f"{result.tokens_per_s:,.0f} tokens/s; model in {result.run_dir}"
            )
            if result.disk:
                from qkv.commands._align_args import disk_line

                print(disk_line(result.disk))
    finally:
        D.teardown()
    return 0

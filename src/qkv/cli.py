"""The `qkv` command. Each verb is a module in qkv/commands/ with a one-line docstring,
`add_arguments(parser)` and `run(args) -> int | None`; heavy imports happen inside run
so `qkv --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import qkv.commands


def _verbs() -> dict[str, object]:
    verbs = {}
    for info in pkgutil.iter_modules(qkv.commands.__path__):
        if not info.name.startswith("_"):
            verbs[info.name.replace("_", "-")] = importlib.import_module(f"qkv.commands.{info.name}")
    return dict(sorted(verbs.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="qkv: a complete, readable and fast LLM stack")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module in _verbs().items():
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            verb,
            help=doc.splitlines()[0] if doc else "",
            description=doc,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"qkv {args.verb}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

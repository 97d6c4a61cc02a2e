"""The `qkv` command. Each verb is a module in qkv/commands/ with a docstring whose first
sentence is its summary, `add_arguments(parser)` and `run(args) -> int | None`; heavy imports
happen inside run so `qkv --help` stays fast.

Mistakes get one line that names the problem, under the verb's own usage: an unknown option
with the closest real one, a stray `key=value` with the option to write instead, a bad value.
An error while running is one line too; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import pkgutil
import re
import sys

import qkv.commands

DEBUG_HINT = "run with --debug for the traceback"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not when the help already says it ("default: ..."),
    nor None (the help says what happens without the option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" in help or action.default is None or action.default is argparse.SUPPRESS:
            return help
        return super()._get_help_string(action)


class VerbParser(argparse.ArgumentParser):
    """A parser whose errors are one line under its own usage, with a did-you-mean."""

    def error(self, message: str):  # argparse's hook: must not return
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)}\n")

    def _suggestion(self, message: str) -> str:
        if message.startswith("argument VERB: invalid choice"):
            choices = re.findall(r"'([^']+)'", message.split("(choose from", 1)[-1])
            given = re.search(r"invalid choice: '([^']+)'", message)
            close = difflib.get_close_matches(given.group(1), choices, n=1) if given else []
            return f"; did you mean '{close[0]}'?" if close else ""
        return ""

    def unknown_arguments(self, extras: list[str]) -> None:
        """Refuse what no option took: a `key=value` gets the option spelling, an unknown
        option the closest known one."""
        for arg in extras:
            if not arg.startswith("-") and "=" in arg:
                key, value = arg.split("=", 1)
                flag = "--" + key.replace("_", "-")
                self.error(f"stray argument {arg!r}: options are written as `{flag} {value}`")
        options = [s for s in self._option_string_actions if s.startswith("--")]
        for arg in extras:
            if arg.startswith("-"):
                close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; see `{self.prog} --help`"
                self.error(f"unrecognized option {arg}{hint}")
        self.error(f"unrecognized arguments: {' '.join(extras)}")

    def check_overrides(self, overrides: list[str]) -> None:
        """Positional `key=value` overrides of a key that also has an option get that option's
        type check now, not a traceback deep in the run."""
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                self.error(f"stray argument {item!r}: overrides are written key=value, options as --key value")
            action = self._option_string_actions.get("--" + key.replace("_", "-"))
            if action is None or action.type is None or not callable(action.type):
                continue
            try:
                action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                kind = getattr(action.type, "__name__", "valid")
                self.error(f"{item}: invalid {kind} value {value!r}; write it as `{action.option_strings[0]} VALUE`")


def _verbs() -> dict[str, object]:
    verbs = {}
    for info in pkgutil.iter_modules(qkv.commands.__path__):
        if not info.name.startswith("_"):
            verbs[info.name.replace("_", "-")] = importlib.import_module(f"qkv.commands.{info.name}")
    return dict(sorted(verbs.items()))


def summary(doc: str) -> str:
    """The first sentence of a docstring, whole even when it wraps over several lines."""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    match = re.search(r"[.!?](?=\s+[A-Z(`])", paragraph)
    return paragraph[: match.start() + 1] if match else paragraph


def build_parser() -> tuple[VerbParser, dict[str, VerbParser]]:
    from qkv import __version__

    parser = VerbParser(prog="qkv", description="qkv: a complete, readable and fast LLM stack")
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    parser.add_argument(
        "--debug", dest="debug_all", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=VerbParser)
    verb_parsers = {}
    for verb, module in _verbs().items():
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(verb, help=summary(doc), description=doc, formatter_class=HelpFormatter)
        module.add_arguments(p)
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
        p.set_defaults(_run=module.run)
        verb_parsers[verb] = p
    return parser, verb_parsers


def main(argv: list[str] | None = None) -> int:
    parser, verb_parsers = build_parser()
    args, extras = parser.parse_known_args(argv)
    if not getattr(args, "verb", None):
        if extras:
            parser.unknown_arguments(extras)
        parser.print_help()
        return 2
    verb_parser = verb_parsers[args.verb]
    if extras:
        verb_parser.unknown_arguments(extras)
    if isinstance(getattr(args, "overrides", None), list):
        verb_parser.check_overrides(args.overrides)
    try:
        return args._run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug keeps the traceback for a bug report
        if args.debug or args.debug_all:
            raise
        expected = isinstance(e, (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError))
        message = str(e) if expected else f"{type(e).__name__}: {e}"
        print(f"qkv {args.verb}: error: {message} ({DEBUG_HINT})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

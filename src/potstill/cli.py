"""The `potstill` command: one entry point, a subcommand per job.

Each subcommand's module owns its flags (`add_arguments`) and its work (`main`); modules are
imported only when their subcommand runs, so a teacher node never imports the trainer.
A user's mistake (`UsageError`, a settings `ValidationError`, or an error type the module lists
in `USER_ERRORS`) is one line on stderr and exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError

from potstill.usage import UsageError, one_line

SUBCOMMANDS = {
    "serve": ("teacher_service.serve", "serve a teacher model over HTTP and gRPC"),
    "query": ("trainer_client.query", "score or sample from a teacher endpoint"),
    "collect": ("trainer_client.collect", "ask teachers once over a dataset and store their answers as a teacher cache"),
    "train": ("trainer_client.trainer", "train a student from teacher endpoints or a teacher cache"),
    "eval": ("trainer_client.evaluate", "evaluate a saved model: accuracy, CE on references, KL to each teacher"),
    "demo": ("potstill.demo", "the whole system on a toy task: serve a teacher, distil a student, report"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake said in one line (not the whole usage): the flag and what is wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="potstill", description="Knowledge distillation of language models across the network.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported: its flags are all that is needed.
        if name == _command(argv):
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.main, user_errors=getattr(module, "USER_ERRORS", ()))
    return parser


def _command(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    args.argv = argv  # a command to continue a run repeats the one that started it
    try:
        args.run(args)
    except (UsageError, ValidationError, *args.user_errors) as error:
        if args.debug:
            raise
        print(f"potstill {args.command}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

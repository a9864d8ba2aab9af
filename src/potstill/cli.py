"""The `potstill` command: one entry point, a subcommand per job.

Each subcommand's module owns its flags (`add_arguments`) and its work (`main`); modules are
imported only when their subcommand runs, so a teacher node never imports the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("teacher_service.serve", "serve a teacher model over HTTP and gRPC"),
    "query": ("trainer_client.query", "score or sample from a teacher endpoint"),
    "collect": ("trainer_client.collect", "ask teachers once over a dataset and store their answers as a teacher cache"),
    "train": ("trainer_client.trainer", "train a student from teacher endpoints or a teacher cache"),
    "demo": ("potstill.demo", "the whole system on a toy task: serve a teacher, distil a student, report"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potstill", description="Knowledge distillation of language models across the network.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported: its flags are all that is needed.
        if name in argv[:1]:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

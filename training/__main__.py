"""Train a Siamese similarity model on an image-folder dataset, evaluate an exported one, upgrade one exported
by an earlier version to the current format, or compile its backbone for this machine.

Run `python -m training COMMAND --help` (train, evaluate, upgrade, compile) for every option."""

from __future__ import annotations

import argparse
import sys

from training.compile import add_compile_arguments, compile_model
from training.errors import UsageError
from training.evaluate import add_evaluate_arguments, evaluate
from training.train import add_train_arguments, train
from training.upgrade import add_upgrade_arguments, upgrade


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    train_parser = commands.add_parser(
        "train", help="train on an image-folder dataset and export model.pt + manifest.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_arguments(train_parser)
    train_parser.set_defaults(handler=train)
    evaluate_parser = commands.add_parser(
        "evaluate", help="evaluate an exported model on an image-folder dataset with the paper's pair protocol",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_evaluate_arguments(evaluate_parser)
    evaluate_parser.set_defaults(handler=evaluate)
    upgrade_parser = commands.add_parser(
        "upgrade", help="re-export a model folder in the current format (same weights, same scores)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_upgrade_arguments(upgrade_parser)
    upgrade_parser.set_defaults(handler=upgrade)
    compile_parser = commands.add_parser(
        "compile", help="compile a model folder's backbone program for this machine (the service's COMPILE cache)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_compile_arguments(compile_parser)
    compile_parser.set_defaults(handler=compile_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in the manifest: the exact command that made the model
    try:
        args.handler(args)
    except UsageError as error:
        parser.exit(2, f"{parser.prog} {argv[0]}: error: {error}\n")


if __name__ == "__main__":
    main()

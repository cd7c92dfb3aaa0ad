"""The `fastkd` command: thin subcommands, each implemented in the module that owns its job.

    fastkd demo-data OUT                 # ImageNet-style folder from scikit-learn's digits
    fastkd pack SRC OUT                  # FFCV .beton + DALI WebDataset shards, one manifest
    fastkd verify OUT                    # re-hash a packed directory (or a teacher cache) against its manifest
    fastkd train --data OUT ...          # teacher + two students, uncertainty-aware dual KD
    fastkd eval CHECKPOINT --data OUT    # top-1/top-5 of a checkpoint
    fastkd teacher-cache --data OUT ...  # the teacher's logits over K views per image, once
    fastkd quickstart                    # demo data -> pack -> teacher -> students -> report

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`, or `parse(argv)`
for a command line it parses itself (`train`: tyro, args.argv holds its arguments); modules are
imported only when their subcommand runs, so `fastkd --help` stays fast and a missing optional
package (FFCV, DALI) only matters to the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastkd.errors import FastKDError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("fastkd.preprocess.demo", "write the embedded digits demo as an ImageNet-style folder"),
    "pack": ("fastkd.preprocess.pack_cmd", "pack an ImageNet-style folder, or any folder with a labels CSV, into FFCV and DALI formats"),
    "verify": ("fastkd.preprocess.verify", "re-hash a packed directory or teacher cache against its manifest"),
    "train": ("fastkd.train_cmd", "train a teacher or two students with (uncertainty-aware) distillation"),
    "eval": ("fastkd.eval_cmd", "evaluate a checkpoint on a packed directory"),
    "teacher-cache": ("fastkd.cache_cmd", "run the teacher once over K augmented views of every train image"),
    "quickstart": ("fastkd.quickstart", "demo data -> pack -> teacher -> two students -> report"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name != chosen:
            subparsers.add_parser(name, help=help_text, description=help_text)
            continue
        module = importlib.import_module(module_name)  # import only the module that will run
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if not hasattr(module, "parse"):
            module.add_arguments(sub)
        if module.__doc__:
            sub.description = module.__doc__
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    if hasattr(module, "parse"):  # a subcommand with its own parser (help included) gets its argv whole
        at = argv.index(next(a for a in argv if not a.startswith("-")))
        args = argparse.Namespace(command=argv[at], argv=argv[at + 1 :])
    else:
        args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except FastKDError as error:
        from fastkd.torchrun import report_error  # every rank raises it; rank 0 alone says it

        report_error(f"fastkd {args.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        from fastkd.notes import say

        say("fastkd: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

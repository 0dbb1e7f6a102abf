"""The ``feataug`` console command.

Each subcommand lives in a library module exposing ``add_arguments(parser)`` and
``main(args) -> int``; the module is imported only when its subcommand runs, so
``feataug --help`` and ``feataug env`` stay fast. A :class:`~pretrain.errors.FeatAugError` from
a subcommand is printed here, once for all of them, as ``feataug COMMAND: error: MESSAGE``: exit
status 2 (a refusal), or 1 for a :class:`~pretrain.errors.TrainingError` (a run that had to stop);
Ctrl-C is one line too (pretraining's says where it stopped and what is intact), exit status 130.
A command's flags may also follow its KEY VALUE overrides (:func:`parse_args`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("feataug.env", "versions of torch, torchvision, detectron2, CUDA and COCO evaluators"),
    "pretrain": ("pretrain.engine", "self-supervised pretraining (MoCo v2 / SimSiam / BYOL + FA)"),
    "lincls": ("feataug.lincls", "linear evaluation of any pretraining checkpoint convert reads"),
    "convert": ("transfer.convert", "convert a pretraining checkpoint into Detectron2 weights"),
    "detect": ("transfer.detect", "fine-tune and evaluate Faster/Mask R-CNN with Detectron2"),
    "coco-eval": ("transfer.coco_eval", "COCO-evaluate a results file against ground truth"),
    "prepare-data": ("feataug.data", "fetch and convert the registry datasets"),
    "demo": ("feataug.demo", "end-to-end demo: pretrain, convert, fine-tune, evaluate"),
    "bench": ("feataug.bench", "benchmarks against peer implementations"),
    "study": ("feataug.study", "run a grid of FA pretraining experiments"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog="feataug",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FeatAug: feature-augmented self-supervised pretraining and detection transfer.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `feataug COMMAND --help` for its options.",
        usage="feataug [-h] [--version] COMMAND [ARGS ...]",
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, taking the command's flags after its KEY VALUE overrides
    too: ``opts`` (``argparse.REMAINDER``) swallows them, so each flag found where a KEY would
    be is moved, with its values, before the overrides and ``argv`` parsed again. Everything
    after ``--`` stays an override."""
    args = parser.parse_args(argv)
    opts = getattr(args, "opts", None) or []
    flags, overrides, i = [], [], 0
    while i < len(opts) and opts[i] != "--":
        action = parser._option_string_actions.get(opts[i].split("=", 1)[0])
        if action is None:  # a KEY and its VALUE
            overrides += opts[i:i + 2]
            i += 2
            continue
        n = 0 if "=" in opts[i] else 1 if action.nargs in (None, "+") else \
            action.nargs if isinstance(action.nargs, int) else 0
        flags += opts[i:i + 1 + n]
        i += 1 + n
    if not flags:
        return args
    return parser.parse_args(argv[:len(argv) - len(opts)] + flags + overrides + opts[i:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    top.add_argument("--version", action="store_true", help="print the version and exit")
    if not argv or argv[0] not in COMMANDS:
        args, rest = top.parse_known_args(argv)
        if args.version:
            from feataug import __version__

            print(f"feataug {__version__}")
            return 0
        if rest:
            top.error(f"unknown command {rest[0]!r}")
        top.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"feataug {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parse_args(parser, rest)
    if getattr(args, "config_file", ""):  # configs/... names a packaged config from any folder
        from feataug import find_config

        args.config_file = str(find_config(args.config_file))
    from pretrain.errors import FeatAugError, TrainingError  # here: --help stays free of torch

    if hasattr(sys.stdout, "reconfigure"):  # non-ASCII names print on an ASCII console too
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return int(module.main(args) or 0)
    except FeatAugError as e:  # every refusal: one line, no traceback
        print(f"feataug {name}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (pretraining says where it stopped)
        print(f"feataug {name}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

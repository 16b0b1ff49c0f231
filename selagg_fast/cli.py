"""Command line: selagg-fast {demo, probe, analyze, plot, maps, localize, compare, models, bench}."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _bench(args) -> None:
    # bench/ installs as selagg_fast.bench; only the CLI reaches into it, at command time.
    from .files import check_writable
    check_writable(args.out, flag="--out")
    if args.what in ("abmilp", "all"):
        from .bench import abmilp
        abmilp.run(quick=args.quick, with_compile=not args.no_compile, csv_path=f"{args.out}/abmilp.csv")
    if args.what in ("attention", "all"):
        from .bench import attention
        attention.run(quick=args.quick, with_compile=not args.no_compile, csv_path=f"{args.out}/attention.csv")
    if args.what in ("analyze", "all"):
        from .bench import analyze
        analyze.run(quick=args.quick, csv_path=f"{args.out}/analyze.csv")
    if args.what == "sweep":  # not part of "all": a GPU session runs it on purpose
        from .bench import sweep
        sweep.run(quick=args.quick, csv_path=f"{args.out}/sweep.csv")
    if args.what in ("probe", "all"):
        from .bench import probe
        probe.run(quick=args.quick, csv_path=f"{args.out}/probe.csv")
    if args.what in ("heads", "all"):
        from .bench import heads
        heads.run(quick=args.quick, with_compile=not args.no_compile, csv_path=f"{args.out}/heads.csv")
    if args.what in ("compare", "all"):
        from .bench import compare
        compare.run(quick=args.quick, csv_path=f"{args.out}/compare.csv")


def _models(args) -> None:
    from .zoo import preset_table
    print(preset_table())


def _demo(args) -> None:
    from .demo import run_demo
    from .files import check_writable
    check_writable(args.out, flag="--out")
    run_demo(args)


def _probe(args) -> None:
    from .probe.cli import config_from_args
    from .probe.outputs import format_results
    from .probe.trainer import run_probe
    results = run_probe(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(results))
        print(f"top-1 / top-5 of every pair: {args.output_dir}/results.json; per epoch: metrics.jsonl, curves.png")


_EPILOG = ("Errors (a bad flag value or path, an unwritable output folder, a full disk, an unsafe checkpoint) "
           "are one line on stderr and exit status 2; SELAGG_TRACEBACK=1 shows where one was raised.")


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its --help line, unless the text already states it; on/off
    switches (store_true / store_false) are off / on unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.required or isinstance(
                action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand's --help shows every default."""
    parser = argparse.ArgumentParser(prog="selagg-fast", description=__doc__, epilog=_EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="built-in demo: cls / avg / selective / attention-derived probes and the analysis tools on synthetic data (~1-2 min on a CPU)")
    p.add_argument("--out", default="selagg_demo", help="folder for the demo's cache and run")
    p.set_defaults(func=_demo)

    from .probe.cli import add_probe_arguments
    p = sub.add_parser("probe", help="train [cls] / average / Selective Aggregation probes on a frozen timm ViT")
    add_probe_arguments(p)
    p.set_defaults(func=_probe)

    from .analysis.cli import add_analysis_commands
    add_analysis_commands(sub)

    p = sub.add_parser("models", help="the paper's backbones by name (--model presets): family, architecture, "
                                      "official file, layout, probed block, the paper's top-1")
    p.set_defaults(func=_models)

    p = sub.add_parser("bench", help="microbenchmarks against eager PyTorch and torch.compile")
    p.add_argument("what", choices=["abmilp", "attention", "probe", "heads", "analyze", "compare", "sweep", "all"],
                   help="which benchmark (sweep: the launch-configuration sweep, not part of all)")
    p.add_argument("--quick", action="store_true", help="ViT-B shape only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (slow to compile)")
    p.add_argument("--out", default="bench/out", help="folder for CSV results")
    p.set_defaults(func=_bench)

    for command in sub.choices.values():
        command.formatter_class = _DefaultsShown
        command.epilog = command.epilog or _EPILOG
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a value argparse refused (2, its message printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    from .distributed import shutdown_distributed
    finished = False
    try:
        args.func(args)
        finished = True
    except _user_errors() as e:
        # a bad path, flag, checkpoint or an unwritable output: the message says what to change; a
        # traceback would bury it
        if os.environ.get("SELAGG_TRACEBACK", "0") not in ("", "0"):
            raise
        message = " ".join(str(e).split("\n")) or type(e).__name__
        print(f"selagg-fast {args.command}: error: {message}", file=sys.stderr)
        logging.getLogger("selagg_fast").debug("SELAGG_TRACEBACK=1 shows where the error was raised")
        return 2
    finally:
        shutdown_distributed(synchronize=finished)  # under torchrun: no rank exits with gloo threads alive
    return 0


def _user_errors() -> tuple:
    # ValueError: a bad flag value (CheckpointError is one); OSError: a missing path, a file in the
    # way, an unreadable input, an output that cannot be written (OutputError, DiskSpaceError)
    return (ValueError, OSError)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: selagg-fast {demo, probe, analyze, plot, maps, localize, compare, models, report, bench}."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
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
    if args.what in ("knn", "all"):
        from .bench import knn
        knn.run(quick=args.quick, csv_path=f"{args.out}/knn.csv")


def _models(args) -> None:
    from .zoo import preset_table
    print(preset_table())


def _demo(args) -> None:
    from .demo import run_demo
    from .files import check_writable
    check_writable(args.out, flag="--out")
    run_demo(args)


def command_line(argv: list) -> str:
    """This invocation as a shell command: ``selagg-fast ARGS``, under ``torchrun`` with the
    process count it ran with."""
    import shlex
    words = ["selagg-fast", *argv]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = f" --nnodes={world // local}" if world != local else ""
        return f"torchrun{nodes} --nproc_per_node={local} -m selagg_fast.cli " + shlex.join(argv)
    return shlex.join(words)


def _probe(args) -> None:
    from .probe.cli import config_from_args
    from .probe.knn_run import format_knn
    from .probe.outputs import format_results
    from .probe.trainer import run_probe
    cfg = config_from_args(args)
    results = run_probe(cfg, command=command_line(args.argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_results(results))
        if results.get("knn"):
            print(format_knn(results["knn"]))
        print(f"top-1 / top-5 of every pair: {args.output_dir}/results.json; per epoch: metrics.jsonl, curves.png")
        done = results.get("epochs_done", cfg.epochs)
        if done < cfg.epochs:  # --stop-after-epochs: an unfinished run, not a result
            print(f"stopped after epoch {done} of {cfg.epochs} (--stop-after-epochs): the table is epoch {done}'s; "
                  f"continue with: selagg-fast probe --resume --output-dir {args.output_dir}")


def _report(args) -> None:
    from .probe.report import write_report
    md, csv_path = write_report(args.runs, args.output)
    print(f"wrote {md} and {csv_path} ({len(args.runs)} run(s))")


_EPILOG = ("Errors (a bad flag value or path, an unwritable output folder, a full disk, an unsafe checkpoint, an "
           "output folder another run is using) are one line on stderr and exit status 2; SELAGG_TRACEBACK=1 "
           "shows where one was raised. Ctrl-C / SIGTERM: one line, exit status 130 / 143, what was saved is kept.")


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

    p = sub.add_parser("report", help="one row per probing run (k-NN, linear, Selective, AP, EP top-1, the command "
                                      "line, the paper's numbers): a Markdown table and the same as CSV")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`selagg-fast probe` output folders")
    p.add_argument("--output", required=True, metavar="FILE.md",
                   help="the Markdown file; the CSV is written beside it as FILE.csv")
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="microbenchmarks against eager PyTorch and torch.compile")
    p.add_argument("what", choices=["abmilp", "attention", "probe", "heads", "analyze", "compare", "knn", "sweep", "all"],
                   help="which benchmark (sweep: the launch-configuration sweep, not part of all)")
    p.add_argument("--quick", action="store_true", help="ViT-B shape only (knn: 2,000 training rows on a CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (slow to compile)")
    p.add_argument("--out", default="bench/out", help="folder for CSV results")
    p.set_defaults(func=_bench)

    for command in sub.choices.values():
        command.formatter_class = _DefaultsShown
        command.epilog = command.epilog or _EPILOG
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        show_traceback = traceback_wanted()
        args = build_parser().parse_args(argv)
        args.argv = argv
    except SystemExit as exit_:  # --help (0) or a value argparse refused (2, its message printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    except ValueError as e:
        print(f"selagg-fast: error: {e}", file=sys.stderr)
        return 2
    from .distributed import shutdown_distributed
    from .files import Interrupted, interrupts_raise
    finished = False
    try:
        with interrupts_raise():
            args.func(args)
        finished = True
    except _user_errors() as e:
        # a bad path, flag, checkpoint or an unwritable output: the message says what to change; a
        # traceback would bury it
        if show_traceback:
            raise
        message = " ".join(str(e).split("\n")) or type(e).__name__
        print(f"selagg-fast {args.command}: error: {message}", file=sys.stderr)
        logging.getLogger("selagg_fast").debug("SELAGG_TRACEBACK=1 shows where the error was raised")
        return 2
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (Interrupted): what was saved stays saved
        if show_traceback:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        message = str(e) if isinstance(e, Interrupted) and str(e) else "interrupted"
        _release_frames(e)  # progress bars of the interrupted loop close now, not after the message
        print(f"selagg-fast {args.command}: {message}", file=sys.stderr)
        return 128 + int(signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    finally:
        shutdown_distributed(synchronize=finished)  # under torchrun: no rank exits with gloo threads alive
    return 0


def _release_frames(err: BaseException) -> None:
    while err is not None:
        err.__traceback__, err = None, err.__context__
    gc.collect()


def traceback_wanted() -> bool:
    """``SELAGG_TRACEBACK``: 1/true/yes/on show tracebacks, 0/false/no/off or unset do not."""
    value = os.environ.get("SELAGG_TRACEBACK", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"SELAGG_TRACEBACK={value!r}: use 1/true/yes to show tracebacks, 0/false/no to hide them")


def _user_errors() -> tuple:
    # ValueError: a bad flag value (CheckpointError is one); OSError: a missing path, a file in the
    # way, an unreadable input, an output that cannot be written (OutputError, DiskSpaceError)
    return (ValueError, OSError)


if __name__ == "__main__":
    sys.exit(main())

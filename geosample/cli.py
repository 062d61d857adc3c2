"""The ``geosample`` command: ``geosample <command> [options]``.

``geosample`` alone (or with options only) runs the main job, ``geosample sample``.  Each command
lives in ``geosample.commands.<name>`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when used.

A user error (a bad option value or device, a missing file, an unwritable ``--out``, a job too
large for the memory, a model producing NaN: ValueError, TypeError, KeyError, OSError, MemoryError
or FloatingPointError out of a command) prints ``geosample: error: <message>`` and exits with
status 2, like an argparse error; ``--debug`` (anywhere on the line) shows the traceback instead.
Ctrl-C prints ``geosample: interrupted`` and exits with 130; outputs are published atomically at the
end of a run, so an interrupted or failed run leaves no partial files and no empty output folder.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("sample", "gits", "analyze", "fid")
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, MemoryError, FloatingPointError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _load(name: str):
    return importlib.import_module(f"geosample.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geosample", description="Fast few-step diffusion sampling "
                                     "with geometry-inspired (GITS) schedules.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = _load(name)
        except ModuleNotFoundError as e:
            if e.name != f"geosample.commands.{name}":
                raise
            continue
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common]))
    return parser


def _message(e: BaseException) -> str:
    """One line for a user error: KeyError's repr quotes are dropped, an OSError keeps its path."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["sample", *argv]  # the main job: `geosample [options]` runs `geosample sample [options]`
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        if getattr(args, "device", None) is not None:
            from ._device import check_device
            args.device = str(check_device(args.device))
        return int(_load(args.command).run(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{parser.prog}: error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank (rank 0 may still be writing), then tear the group down,
    so no rank exits with live collective threads."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

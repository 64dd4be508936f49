"""The `hwattn` command. Each subcommand lives in a module of this package that defines
`register(subparsers)`; `hwattn bench X` subcommands register under the `bench` group.
A listed module that is not present (a partial install) is left out of the menu."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys
import threading

# Modules of hwattn.cli, in the order `hwattn --help` lists them.
COMMANDS = ("compare", "analyze", "demo", "data", "train", "eval", "serve", "convert")
# Modules of hwattn.cli registering a subcommand of `hwattn bench`.
BENCH_COMMANDS = ("bench_decode", "bench_engine", "bench_prefill", "bench_serve")


def add_cpu_threads(p: argparse.ArgumentParser) -> None:
    """The `--cpu-threads` option every subcommand takes (applied by `main`)."""
    p.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: 1 for models under 20M parameters, else the "
                        "idle cores; OMP_NUM_THREADS is honoured)")


def emit_json(doc: dict, out: str | None = None) -> None:
    """A benchmark's last line: its document as one line of JSON on stdout (flushed), and in
    `out` too when given, replacing an earlier file whole (`hwattn.files.write_text`)."""
    import json

    from hwattn.files import write_text

    line = json.dumps(doc)
    if out:
        write_text(out, line + "\n")
    print(line, flush=True)


def check_device(device: str | None, flag: str = "--device") -> None:
    """`hwattn.device.check_device` (imported here when called: torch loads only then)."""
    from hwattn.device import check_device as check

    check(device, flag)


def at_least(args, minimum, *names: str) -> None:
    """ValueError naming the option when one of `names` (argparse dests, None = not given)
    is below `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= minimum:  # `not >=`: NaN fails too
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def positive(args, *names: str) -> None:
    """ValueError naming the option when one of `names` is given and not a finite number > 0."""
    import math

    for name in names:
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")


def variant_list(text: str, flag: str = "--variants") -> tuple[str, ...]:
    """The variant labels of a comma-separated `text` as given (blanks dropped); ValueError
    naming `flag` when it names none, or one variant more than once (each would be a second,
    identical row; `gqa-4` and `GQA-04` are one variant). A label that is no variant is left
    for the command to refuse."""
    from hwattn.variants import parse_variant

    labels = tuple(v.strip() for v in text.split(",") if v.strip())
    if not labels:
        raise ValueError(f"{flag} must name at least one variant")
    spellings: dict = {}
    for label in labels:
        try:
            key = tuple(sorted(parse_variant(label).items()))
        except ValueError:
            key = label
        spellings.setdefault(key, []).append(label)
    twice = [names for names in spellings.values() if len(names) > 1]
    if twice:
        said = [names[0] if len(set(names)) == 1 else " = ".join(dict.fromkeys(names))
                for names in twice]
        raise ValueError(f"{flag} names {', '.join(said)} more than once")
    return labels


def check_output_file(path: str | None, flag: str = "--out") -> None:
    """ValueError unless the file `path` can be created: its folder exists and is writable.
    Checked before the work, so a long run does not end in a traceback. None: not given; an
    empty `path` is refused (it would be no file at all, dropped without a word)."""
    import os
    from pathlib import Path

    if path is None:
        return
    if not str(path).strip():
        raise ValueError(f"{flag} must not be empty")
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: folder {folder} is not writable")


def check_output_dir(path: str | None, flag: str = "--out") -> None:
    """ValueError unless the folder `path` exists or can be created (missing parents are
    made): it is not a file, and its nearest existing ancestor is a writable folder. None:
    not given; an empty `path` is refused (it would stand for the current folder, or for a
    command's default folder, without a word)."""
    import os
    from pathlib import Path

    if path is None:
        return
    if not str(path).strip():
        raise ValueError(f"{flag} must not be empty")
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")


def check_not_the_dataset(out: str | None, data: str | None) -> None:
    """ValueError when the run folder --out is the dataset folder --data: the run's files
    (checkpoints, metrics, plots, tables) would be written among the dataset's shards."""
    from pathlib import Path

    if out and data and Path(out).resolve() == Path(data).resolve():
        raise ValueError(f"--out {out} is the dataset folder (--data): the run's files would be "
                         f"written among its shards; give the run a folder of its own")


def check_dataset(path: str | None, flag: str = "--data") -> None:
    """ValueError for a pack (`hwattn data pack`) given where a built dataset is read."""
    from pathlib import Path

    if path and (Path(path) / "pack.json").is_file():
        raise ValueError(f"{flag} {path} is a pack of a dataset, not the dataset: unpack it "
                         f"first (`hwattn data unpack {path} --out DIR`, then {flag} DIR)")


def model_params(config) -> int:
    """Parameters of the model `config` describes, counted without allocating it."""
    from hwattn.models.transformer import Transformer

    return Transformer(config, device="meta").num_params()


def _present(names):
    return [n for n in names if importlib.util.find_spec(f"hwattn.cli.{n}") is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwattn",
        description="Hardware-efficient attention: GTA, GLA, MLA, GQA, MQA and MHA layers, "
                    "paged decode kernels, training and serving.")
    from hwattn import __version__
    parser.add_argument("--version", action="version", version=f"hwattn {__version__}",
                        help="print the installed hwattn version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _present(COMMANDS):
        importlib.import_module(f"hwattn.cli.{name}").register(sub)
    bench_names = _present(BENCH_COMMANDS)
    if bench_names:
        bench = sub.add_parser("bench", help="benchmarks (decode and prefill kernels, engine, server)",
                               description="Benchmarks that print the physics: time, GB/s, "
                                           "TFLOP/s and distance to the roofline.")
        bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
        for name in bench_names:
            importlib.import_module(f"hwattn.cli.{name}").register(bench_sub)
    return parser


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so commands stop their worker processes on the way out.
        signal.signal(signal.SIGTERM, _terminated)
    # The full command in messages: `hwattn bench decode: error: ...` (as argparse names it).
    name = " ".join(["hwattn", args.command] + [getattr(args, k) for k in ("bench_command",
                                                                            "data_command")
                                                 if getattr(args, k, None)])
    try:
        if getattr(args, "cpu_threads", None) is not None:
            from hwattn.cpu_threads import set_cpu_threads

            at_least(args, 1, "cpu_threads")  # named as the option, not as the library's name
            set_cpu_threads(args.cpu_threads)
        return args.func(args) or 0
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status, not a traceback
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder that cannot be read or written: one line
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

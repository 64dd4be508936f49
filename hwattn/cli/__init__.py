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
    `out` too when given."""
    import json

    line = json.dumps(doc)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


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
    parser.add_argument("--version", action="version", version=f"hwattn {__version__}")
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
    try:
        if getattr(args, "cpu_threads", None) is not None:
            from hwattn.cpu_threads import set_cpu_threads

            set_cpu_threads(args.cpu_threads)
        return args.func(args) or 0
    except ValueError as err:
        print(f"hwattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

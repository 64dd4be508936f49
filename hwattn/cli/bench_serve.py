"""`hwattn bench serve`: load-test a running server (--url) or an in-process engine."""

from __future__ import annotations

import sys

from hwattn.cli import emit_json


def register(sub) -> None:
    from hwattn.cli.serve import add_engine_args

    p = sub.add_parser("serve", help="serving load generator: throughput, TTFT, ITL, TPOT, e2e",
                       description="Sends N completion requests (seeded prompt lengths) with a "
                                   "concurrency cap and/or Poisson arrivals to a running hwattn "
                                   "server on loopback (--url), or to a model served in-process "
                                   "(give MODEL instead). Bounded in count and time.")
    p.add_argument("model", nargs="?", default=None,
                   help="serve this checkpoint/preset in-process (instead of --url)")
    p.add_argument("--url", default=None, help="running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--served-model-name", default=None, help="model name at --url (default: its first)")
    p.add_argument("--http", action="store_true",
                   help="in-process mode: go through a real uvicorn on a loopback port too")
    p.add_argument("--num-prompts", type=int, default=32,
                   help="completion requests N to send (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=256,
                   help="mean prompt length in tokens (default %(default)s)")
    p.add_argument("--prompt-spread", type=float, default=0.5,
                   help="lengths uniform in mean·(1 ± spread) (default 0.5)")
    p.add_argument("--output-len", type=int, default=64,
                   help="tokens generated per request, end-of-sequence ignored (default "
                        "%(default)s)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: no cap)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals per second (default: every request at once)")
    p.add_argument("--max-duration", type=float, default=600.0,
                   help="stop after this many seconds (default %(default)s)")
    p.add_argument("--warmup-requests", type=int, default=2,
                   help="short requests sent and discarded before timing (default 2)")
    p.add_argument("--json", action="store_true",
                   help="print only the JSON line (no report, no progress bar)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar of the requests on stderr")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from hwattn.bench.serve import bench_serve, format_report, prompt_lengths

    check_args(args)
    lengths = prompt_lengths(args.num_prompts, args.prompt_len, args.prompt_spread, args.seed)
    engine = None
    try:
        if args.model is not None:
            from hwattn.cli.serve import engine_from_args

            engine = engine_from_args(args)
        doc = bench_serve(lengths, args.output_len, url=args.url,
                          served_model_name=args.served_model_name, engine=engine,
                          http=args.http, max_concurrency=args.max_concurrency,
                          request_rate=args.request_rate, seed=args.seed,
                          max_duration_s=args.max_duration,
                          warmup_requests=args.warmup_requests,
                          progress=not (args.json or args.no_progress))
    except Exception as err:
        if not _http_error(err):
            raise
        # The server at --url is not there or not answering: one line, not a traceback.
        print(f"hwattn bench serve: error: --url {args.url}: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.shutdown()
    doc.update(target=args.url or f"in-process {args.model} ({'http' if args.http else 'direct'})",
               num_prompts=args.num_prompts, prompt_len=args.prompt_len,
               prompt_spread=args.prompt_spread)
    if not args.json:
        print(format_report(doc))
    emit_json(doc, args.out)
    if not doc["completed"]:  # nothing was measured: a failure, whatever the cause
        print(f"hwattn bench serve: error: none of the {doc['requests']} requests completed"
              + (f" ({doc['errors'][0]})" if doc.get("errors") else ""), file=sys.stderr)
        return 1
    return 0


def _http_error(err: Exception) -> bool:
    try:
        import httpx
    except ImportError:
        return False
    return isinstance(err, httpx.HTTPError)


def engine_option_defaults() -> dict:
    """The engine options (`add_engine_args`) as they are when not given."""
    import argparse

    from hwattn.cli.serve import add_engine_args

    p = argparse.ArgumentParser(add_help=False)
    add_engine_args(p)
    return vars(p.parse_args([]))


def check_args(args) -> None:
    """ValueError for values out of range, and for options a --url run would not use."""
    from hwattn.cli import at_least, check_output_file, positive

    if (args.url is None) == (args.model is None):
        raise ValueError("give either --url (a running server) or MODEL (in-process)")
    if not 0 <= args.prompt_spread < 1:
        raise ValueError(f"--prompt-spread must be in [0, 1), got {args.prompt_spread}")
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    if args.warmup_requests > args.num_prompts:  # the warm-up sends the first prompts again
        raise ValueError(f"--warmup-requests {args.warmup_requests} is more than --num-prompts "
                         f"{args.num_prompts}: the warm-up resends the first prompts, so at "
                         f"most {args.num_prompts} of them")
    at_least(args, 1, "num_prompts", "prompt_len", "output_len", "max_concurrency")
    from hwattn.bench.serve import MAX_REQUESTS

    if args.num_prompts > MAX_REQUESTS:
        raise ValueError(f"--num-prompts must be <= {MAX_REQUESTS}, got {args.num_prompts}")
    positive(args, "request_rate", "max_duration")
    check_output_file(args.out)
    if args.url is not None:
        # The engine options configure the in-process engine; --seed also seeds the prompts
        # and --cpu-threads this process, so both mean something with --url too.
        given = ["--" + k.replace("_", "-") for k, v in engine_option_defaults().items()
                 if k not in ("seed", "cpu_threads") and getattr(args, k) != v]
        if args.http:
            given.insert(0, "--http")
        if given:
            raise ValueError(f"{', '.join(given)} only apply to a model served in-process "
                             f"(MODEL), not to the server at --url")
        return
    if args.served_model_name is not None:
        raise ValueError("--served-model-name only applies with --url (the in-process model "
                         "needs no name)")
    from hwattn.cli.serve import check_attention
    from hwattn.engine.loader import model_config

    check_attention(args)  # named as the option, before the model's shape is read
    overrides = {"max_seq_len": args.max_seq_len} if args.max_seq_len else None
    context = args.max_model_len or model_config(args.model, args.attention, overrides).max_seq_len
    if args.prompt_len + args.output_len > context:
        raise ValueError(f"--prompt-len {args.prompt_len} + --output-len {args.output_len} "
                         f"exceed the model's context of {context} tokens")
    longest = round(args.prompt_len * (1 + args.prompt_spread))  # `prompt_lengths`' bound
    if longest + args.output_len > context:  # such prompts were cut to fit, without a word
        raise ValueError(f"--prompt-len {args.prompt_len} with --prompt-spread "
                         f"{args.prompt_spread:g} makes prompts of up to {longest} tokens, which "
                         f"with --output-len {args.output_len} exceed the model's context of "
                         f"{context} tokens; lower --prompt-len or --prompt-spread")

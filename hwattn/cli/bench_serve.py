"""`hwattn bench serve`: load-test a running server (--url) or an in-process engine."""

from __future__ import annotations

import asyncio
import json


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
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=256, help="mean prompt length")
    p.add_argument("--prompt-spread", type=float, default=0.5,
                   help="lengths uniform in mean·(1 ± spread) (default 0.5)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    p.add_argument("--max-duration", type=float, default=600.0, help="stop after this many seconds")
    p.add_argument("--warmup-requests", type=int, default=2,
                   help="short requests sent and discarded before timing (default 2)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from hwattn.engine.benchmark import random_prompts
    from hwattn.server.loadgen import HttpTarget, InProcessTarget, format_report, prompt_lengths, run_load

    if (args.url is None) == (args.model is None):
        raise ValueError("give either --url (a running server) or MODEL (in-process)")
    if not 0 <= args.prompt_spread < 1:
        raise ValueError(f"--prompt-spread must be in [0, 1), got {args.prompt_spread}")
    lengths = prompt_lengths(args.num_prompts, args.prompt_len, args.prompt_spread, args.seed)
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    engine, server = None, None
    try:
        if args.url:
            def make_target():
                return HttpTarget(args.url, args.served_model_name)
            vocab = 256  # ids every model has; the server's vocabulary is not known here
        else:
            from hwattn.cli.serve import engine_from_args
            from hwattn.server.async_engine import AsyncEngine

            engine = engine_from_args(args)
            vocab = engine.model_config.vocab_size
            limit = engine.max_model_len - args.output_len
            lengths = [min(n, limit) for n in lengths]
            async_engine = AsyncEngine(engine)
            if args.http:
                server, url = _start_server(async_engine)

                def make_target():
                    return HttpTarget(url)
            else:
                direct = InProcessTarget(async_engine)

                def make_target():
                    return direct
        g_prompts = [random_prompts(1, n, vocab, seed=args.seed + i)[0] for i, n in enumerate(lengths)]

        async def measure():
            if args.warmup_requests:  # first requests pay for allocation and kernel compilation
                await run_load(make_target(), g_prompts[:args.warmup_requests], 4, None, None,
                               seed=args.seed, max_duration_s=args.max_duration)
            return await run_load(make_target(), g_prompts, args.output_len, args.max_concurrency,
                                  args.request_rate, seed=args.seed,
                                  max_duration_s=args.max_duration, progress=not args.json)

        doc = asyncio.run(measure())
    finally:
        if server is not None:
            server.should_exit = True
            server.thread.join(timeout=30)
        if engine is not None:
            if not args.url and not args.http:
                async_engine.shutdown()
            engine.shutdown()
    doc.update(target=args.url or f"in-process {args.model} ({'http' if args.http else 'direct'})")
    if not args.json:
        print(format_report(doc))
    line = json.dumps(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


def _start_server(async_engine):
    import socket
    import threading
    import time

    import uvicorn

    from hwattn.server.app import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = build_app(async_engine, "bench")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    server.thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"

"""`hwattn serve`: the OpenAI-compatible server over one model (optionally tensor-parallel,
optionally several data-parallel replicas)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket

from hwattn.config import PRESETS

API_KEY_ENV = "HWATTN_API_KEY"
PROTECT_METRICS_ENV = "HWATTN_PROTECT_METRICS"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options shared by `hwattn serve` and the benchmarks."""
    p.add_argument("--attention", default=None,
                   help="variant for presets: mha, mqa, gqa-4, gta-4, mla, gla-2, ... (default mha)")
    p.add_argument("--dtype", default="auto",
                   help="weights and KV cache: bf16 | fp16 | fp32 | fp64 (or bfloat16, float16, "
                        "half, float32, float, float64) | auto: bf16 on CUDA, fp32 on the CPU "
                        "(default auto)")
    p.add_argument("--device", default="auto",
                   help="cuda | cuda:N | cpu | auto: cuda when present (default auto)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks (processes; NCCL on GPUs, gloo on CPU). A rank "
                        "that dies or stops (no heartbeat for HWATTN_HEARTBEAT_TIMEOUT_S, "
                        "default 5 s) fails the requests in flight; the server then answers "
                        "503 and /health 503 with the reason until the server is restarted "
                        "(a supervisor can watch /health)")
    p.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1,
                   help="engine replicas, each with --tp ranks on its own GPUs (replica i uses "
                        "GPUs [i*tp, (i+1)*tp)); requests go to the least-loaded one. A replica "
                        "that dies or stops fails only its own requests (503) and is restarted "
                        "in the background (at most HWATTN_REPLICA_RESTARTS times, default 3, "
                        "in 10 minutes); /health answers 200 \"degraded\" meanwhile, and 503 "
                        "once no replica is left")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=64,
                   help="tokens per KV page (default 64; --block-size is vLLM's name)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences per batch at most (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="prompt tokens prefilled per step at most (chunked prefill; default 8192)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: model's)")
    p.add_argument("--memory-budget", default=None,
                   help="KV-cache bytes per rank (e.g. 2e9) or a fraction of free GPU memory (0.85)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="instead of --memory-budget: the fraction of each GPU's whole memory the "
                        "engine may fill, weights included (as vLLM); CUDA only")
    p.add_argument("--speculative", default=None,
                   help="'ngram' or a draft-model checkpoint directory")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="k drafts per step, with --speculative (default 3)")
    p.add_argument("--speculative-disable-batch-size", "--speculative-disable-by-batch-size",
                   dest="speculative_disable_batch_size", type=int, default=None, metavar="N",
                   help="with --speculative: a step that starts with N or more running sequences "
                        "decodes plainly (overlapped with the host, in a CUDA graph) instead of "
                        "verifying drafts (default: always verify; the second name is vLLM's). "
                        "The best N depends on the model and the GPU")
    p.add_argument("--seed", type=int, default=0,
                   help="weights of presets and unseeded requests; the benchmarks' random "
                        "prompts too (default 0)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="decode and prefill steps without captured CUDA graphs")
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="prefill steps launch the compiled pieces between attention steps one by "
                        "one instead of replaying them from CUDA graphs")
    p.add_argument("--no-mixed-batches", action="store_true",
                   help="steps of prompt chunks and steps of decodes apart, prompts first "
                        "(shorter TTFT, longer inter-token latency while prompts arrive); by "
                        "default each step takes every decode and spends the rest of "
                        "--max-num-batched-tokens on prompt chunks")
    p.add_argument("--no-compile", action="store_true",
                   help="decode and prefill steps through the eager decoder blocks, not "
                        "torch.compile'd ones (compiling is on by default on CUDA)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="both of the above, as vLLM's flag of that name")
    caching = p.add_mutually_exclusive_group()
    caching.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt pages")
    caching.add_argument("--enable-prefix-caching", action="store_true",
                         help="share the pages of common prompt prefixes (the default; as vLLM)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM's command lines and ignored: hwattn runs its own model "
                        "code, never code from the checkpoint folder")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="presets only: override the model's max_seq_len (RoPE table)")
    from hwattn.cli import add_cpu_threads

    add_cpu_threads(p)


# `EngineConfig` fields, as the engine's errors name them, and the options that set them here:
# an error says "--page-size must be ...", not "page_size must be ...". (max_seq_len is left:
# the engine names the model's own context by it.)
ENGINE_FLAGS = {
    "tensor_parallel_size": "--tp", "data_parallel_size": "--dp", "page_size": "--page-size",
    "block_size": "--block-size", "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens", "max_model_len": "--max-model-len",
    "memory_budget": "--memory-budget", "gpu_memory_utilization": "--gpu-memory-utilization",
    "num_speculative_tokens": "--num-speculative-tokens",
    "speculative_disable_batch_size": "--speculative-disable-batch-size",
    "speculative": "--speculative",
}


# Where a field that is also an English word ("speculative") stands as a field in a
# message: given a value (`speculative='ngram'`), told what it must be (`speculative must
# ...`), or followed by its values in parentheses (`needs speculative ('ngram' or ...)`).
_AS_FIELD = r"(?=\s*=|\s+must\b|\s+\(['\"])"


def flag_names(text: str) -> str:
    """`text` with every `ENGINE_FLAGS` field it names written as its option. A field with an
    underscore (`max_model_len`) is one wherever it stands as a whole word; a plain word is
    one only where the message uses it as a field (`_AS_FIELD`), so that prose such as
    "speculative decoding" is left as it is."""
    for name in sorted(ENGINE_FLAGS, key=len, reverse=True):  # num_speculative_tokens first
        after = r"(?![\w-])" if "_" in name else _AS_FIELD
        text = re.sub(rf"(?<![\w-]){re.escape(name)}{after}", ENGINE_FLAGS[name], text)
    return text


@contextlib.contextmanager
def options_named():
    """Re-raise the engine's ValueErrors with the options that set its fields (`flag_names`)."""
    try:
        yield
    except ValueError as err:
        raise ValueError(flag_names(str(err))) from None


def check_attention(args) -> None:
    """ValueError naming --attention when it is no variant label, or a variant the preset's
    heads cannot take (gqa-5 of 8 heads): the engine's error named neither. A checkpoint's
    own label is compared with it later (`model_config`)."""
    if args.attention is None or args.model is None:
        return
    from hwattn.config import ModelConfig
    from hwattn.engine.loader import is_checkpoint
    from hwattn.variants import parse_variant

    try:
        fields = parse_variant(args.attention)
        if args.model in PRESETS and not is_checkpoint(args.model):
            ModelConfig.from_preset(args.model, **fields)
    except ValueError as err:
        raise ValueError(f"--attention {args.attention}: {err}") from None


def check_dtype(text: str) -> None:
    """ValueError naming --dtype unless it is 'auto' or a name `hwattn.device.DTYPES` knows
    (the engine checked it only once its worker processes started, naming `dtype`)."""
    from hwattn.device import DTYPES

    if text != "auto" and text not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {text!r}")


def parse_budget(text):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--memory-budget must be a number of bytes (e.g. 2e9) or a fraction "
                         f"of free GPU memory (0.85), got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"--memory-budget must be a finite number > 0, got {text}")
    return value if value <= 1 else int(value)


def engine_config(args):
    """The `EngineConfig` the engine options (`add_engine_args`) describe; vLLM's flags
    (--enforce-eager, --trust-remote-code) go through `vllm_arguments`, as `LLM`'s do."""
    from hwattn.cli import at_least, check_device
    from hwattn.engine import EngineConfig
    from hwattn.engine.llm import vllm_arguments
    from hwattn.engine.loader import is_checkpoint

    check_device(args.device)
    check_dtype(args.dtype)
    check_attention(args)
    at_least(args, 1, "max_model_len", "max_seq_len")
    if args.max_seq_len is not None and is_checkpoint(args.model):
        raise ValueError("--max-seq-len applies to presets only: a checkpoint keeps the context "
                         "it was trained with (--max-model-len lowers the engine's limit)")
    if args.num_speculative_tokens is not None and args.speculative is None:
        raise ValueError(f"--num-speculative-tokens {args.num_speculative_tokens} needs "
                         f"--speculative ('ngram' or a draft checkpoint directory)")
    overrides = {"max_seq_len": args.max_seq_len} if args.max_seq_len is not None else None
    if args.tp > 1 and args.model is not None:  # said before any rank process starts
        from hwattn.engine.loader import model_config
        from hwattn.models.transformer import Transformer

        shape = model_config(args.model, args.attention, overrides)
        try:
            Transformer(shape, device="meta").layers[0].attn.local_heads(args.tp)
        except ValueError as err:
            raise ValueError(f"--tp {args.tp} does not split {shape.label}: {err}") from None
    kwargs = dict(model=args.model, attention=args.attention, dtype=args.dtype,
                  device=args.device, tensor_parallel_size=args.tp, data_parallel_size=args.dp,
                  page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  memory_budget=parse_budget(args.memory_budget),
                  gpu_memory_utilization=getattr(args, "gpu_memory_utilization", None),
                  max_model_len=args.max_model_len, speculative=args.speculative,
                  speculative_disable_batch_size=getattr(args, "speculative_disable_batch_size",
                                                         None),
                  seed=args.seed,
                  enable_prefix_caching=not args.no_prefix_caching, model_overrides=overrides,
                  enforce_eager=args.enforce_eager,
                  trust_remote_code=getattr(args, "trust_remote_code", False))
    if args.num_speculative_tokens is not None:
        kwargs["num_speculative_tokens"] = args.num_speculative_tokens
    if args.no_cuda_graphs:
        kwargs["cuda_graphs"] = False
    if args.no_prefill_graphs:
        kwargs["prefill_graphs"] = False
    if args.no_mixed_batches:
        kwargs["enable_mixed_batches"] = False
    if args.no_compile:
        kwargs["compile_decode"] = kwargs["compile_prefill"] = False
    with options_named():
        return EngineConfig(**vllm_arguments(kwargs))


def cpu_ignored_flags(args) -> list[str]:
    """The GPU-only engine options given for a run on the CPU, where they change nothing:
    steps are captured in CUDA graphs and compiled on CUDA only."""
    from hwattn.device import resolve_device

    if resolve_device(args.device).type != "cpu":
        return []
    return [flag for flag, given in (("--no-cuda-graphs", args.no_cuda_graphs),
                                     ("--no-prefill-graphs", args.no_prefill_graphs),
                                     ("--no-compile", args.no_compile),
                                     ("--enforce-eager", args.enforce_eager)) if given]


def engine_from_args(args):
    import sys

    from hwattn.cli import model_params
    from hwattn.cpu_threads import use_default_cpu_threads
    from hwattn.engine import create_engine

    config = engine_config(args)
    ignored = cpu_ignored_flags(args)
    if ignored:  # said, not dropped: a command line copied from a GPU run
        command = " ".join(["hwattn", getattr(args, "command", "serve")]
                           + [c for c in [getattr(args, "bench_command", None)] if c])
        print(f"{command}: warning: {', '.join(ignored)} "
              f"{'has' if len(ignored) == 1 else 'have'} no effect on the CPU (CUDA graphs, "
              f"prefill's included, and compiled steps are CUDA only)", file=sys.stderr,
              flush=True)
    with options_named():  # the pool's size, the draft model, ... checked as it starts
        engine = create_engine(config)
    use_default_cpu_threads(model_params(engine.model_config), engine.device)
    return engine


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model in PRESETS:
        return f"{args.model}-{args.attention or 'mha'}"
    return args.model.rstrip("/").split("/")[-1]


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0-65535, got {port}")
    return port


def name_list(what: str, upper: bool = False):
    """An argparse type for a CORS option: vLLM's JSON list ('["http://a.example"]') or a
    comma-separated list (http://a.example,http://b.example); `upper`: HTTP methods, which a
    browser's preflight names in capitals."""
    def parse(text: str) -> list[str]:
        if text.lstrip().startswith("["):
            try:
                names = json.loads(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a JSON list of {what} or a "
                                                 f"comma-separated list, got {text!r}") from None
            if not all(isinstance(n, str) for n in names):
                raise argparse.ArgumentTypeError(f"expected a JSON list of strings ({what}), "
                                                 f"got {text!r}")
        else:
            names = text.split(",")
        names = [n.strip().upper() if upper else n.strip() for n in names]
        if not all(names):
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty one in {text!r}")
        return names

    return parse


def origin_list(text: str) -> list[str]:
    """An argparse type: --allowed-origins, each `*` or an origin as a browser sends it
    (scheme://host[:port], no path: "http://a.example/" would match no request)."""
    origins = name_list("origins")(text)
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+", origin):
            raise argparse.ArgumentTypeError(f"expected origins such as http://localhost:3000 "
                                             f"(scheme://host[:port], no path) or *, got "
                                             f"{origin!r}")
    return origins


def check_cors(args) -> None:
    """ValueError naming the CORS options given without --allowed-origins: CORS is off unless
    an origin is allowed (vLLM allows every origin by default; this server none)."""
    given = [flag for flag, value in (("--allowed-methods", args.allowed_methods is not None),
                                      ("--allowed-headers", args.allowed_headers is not None),
                                      ("--allow-credentials", args.allow_credentials)) if value]
    if given and not args.allowed_origins:
        raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} "
                         f"only with --allowed-origins: without it the server sends no CORS "
                         f"headers at all")


def bind(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to (host, port), not yet listening: bound before the engine loads, so
    that a port in use is said at once, and port 0 is known (the kernel's choice) before the
    address is printed. One per address `host` names, as uvicorn's asyncio server binds them
    ("localhost": 127.0.0.1 and ::1; an IPv6 socket takes IPv6 alone, so "::" is not also
    every IPv4 address), all on the port the first gets; an address of a family this machine
    cannot make sockets of (IPv6 turned off) is passed over, as there."""
    def refused(reason) -> OSError:
        return OSError(f"--host {host} --port {port}: cannot listen there: {reason}")

    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise refused(err.strerror or err) from None
    socks: list[socket.socket] = []
    lacking = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as err:  # a family this machine lacks (IPv6 off): passed over,
                lacking = err  # as asyncio's create_server passes over it
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if len(socks) > 1:  # port 0: the others on the port the kernel gave the first
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError as err:
        for sock in socks:
            sock.close()
        raise refused(err.strerror or err) from None
    if not socks:
        raise refused(lacking.strerror or lacking)
    return socks


# `uvicorn.run`'s exit status when the server never started (its app's startup failed).
STARTUP_FAILURE = 3


def listen(app, socks: list[socket.socket], log_level: str) -> int:
    """Serve `app` under uvicorn on the bound `socks` until the server is stopped (Ctrl-C,
    SIGTERM); the exit status, as `uvicorn.run` has it: 0, or STARTUP_FAILURE when the app's
    startup (its lifespan) failed and nothing was served."""
    import logging

    import uvicorn

    host, port = socks[0].getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # uvicorn says where it listens only for a socket it bound itself
                for sock in sockets:
                    logging.getLogger("uvicorn.error").info(
                        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                        url_host(sock.getsockname()[0]), sock.getsockname()[1])

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    try:
        server.run(sockets=socks)
    except KeyboardInterrupt:  # uvicorn has stopped serving: shut down as after SIGTERM
        pass
    return 0 if server.started else STARTUP_FAILURE


def url_host(host: str) -> str:
    """`host` as it stands in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, SSE)",
                       description="Serve a checkpoint directory or a random-weight preset over "
                                   "an OpenAI-compatible API: /v1/completions, "
                                   "/v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                                   "/version, /health, /metrics.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"checkpoint directory or preset {tuple(PRESETS)} (or give --model)")
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the same as the positional MODEL (as vLLM takes either)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=port_number, default=8000,
                   help="port, 0-65535 (default 8000; 0: any free port)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients pass as `model` (default: preset-variant or directory name)")
    p.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS,
                   help="uvicorn log level (default warning)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every /v1 route and the "
                        f"tokenizer routes (default: the {API_KEY_ENV} environment variable; "
                        f"unset: no authentication). /health and /version stay open")
    p.add_argument("--protect-metrics", action="store_true",
                   default=os.environ.get(PROTECT_METRICS_ENV, "").lower() in ("1", "true", "yes"),
                   help=f"with an API key, require it on /metrics and the API docs (/docs, "
                        f"/redoc, /openapi.json) as well. Default: off (or {PROTECT_METRICS_ENV}"
                        f"=1), those stay open to scrapers without the key")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted (413 beyond; default 16 MiB)")
    p.add_argument("--max-request-sequences", type=int, default=None,
                   help="prompts x n one request may ask for (400 beyond; default 256); the "
                        "scheduler also shares the batch fairly between requests")
    p.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                   help="Jinja chat template (a file or the template itself) for "
                        "/v1/chat/completions; default: the checkpoint's tokenizer_config.json "
                        "chat_template, else the built-in <|role|> format")
    p.add_argument("--allowed-origins", type=origin_list, default=None, metavar="ORIGINS",
                   help="origins browsers may call the API from (CORS), as a JSON list or "
                        "comma-separated: '[\"http://localhost:3000\"]', or '*' for any. "
                        "Default: none, and no CORS headers are sent (vLLM allows any origin "
                        "by default)")
    p.add_argument("--allowed-methods", type=name_list("methods", upper=True), default=None,
                   metavar="METHODS",
                   help="with --allowed-origins: the HTTP methods allowed (default '*')")
    p.add_argument("--allowed-headers", type=name_list("headers"), default=None,
                   metavar="HEADERS",
                   help="with --allowed-origins: the request headers allowed (default '*')")
    p.add_argument("--allow-credentials", action="store_true",
                   help="with --allowed-origins: let browsers send cookies and HTTP "
                        "authentication (Access-Control-Allow-Credentials)")
    add_engine_args(p)
    p.set_defaults(func=run)


def resolve_model(args) -> str:
    """The model from the positional MODEL or --model (ValueError if neither, or both differ)."""
    given = [m for m in (args.model, args.model_flag) if m is not None]
    if not given:
        raise ValueError("serve needs a model: hwattn serve MODEL (or --model MODEL)")
    if len(given) == 2 and given[0] != given[1]:
        raise ValueError(f"the positional MODEL {given[0]!r} and --model {given[1]!r} differ; "
                         f"give one")
    return given[0]


def run(args) -> int:
    args.model = resolve_model(args)
    try:
        import uvicorn  # noqa: F401 - `listen` runs it

        from hwattn.server.app import build_app
    except ImportError as err:
        raise ValueError(f"serving needs fastapi and uvicorn: pip install 'hwattn[serve]' ({err})")
    import torch

    from hwattn.cpu_threads import describe
    from hwattn.engine.chat import ChatTemplate
    from hwattn.engine.loader import is_checkpoint
    from hwattn.server.async_engine import AsyncEngine
    from hwattn.server.protocol import ServerLimits

    if not args.host.strip():  # uvicorn would bind '' to every interface
        raise ValueError("--host must not be empty (the default is loopback, 127.0.0.1; give "
                         "--host 0.0.0.0 to listen on every interface)")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    if args.protect_metrics and not api_key:
        raise ValueError(f"--protect-metrics needs an API key (--api-key or {API_KEY_ENV})")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty (leave it out for the "
                         "default name)")
    from hwattn.cli import at_least

    at_least(args, 1, "max_body_bytes", "max_request_sequences")  # named as given here
    caps = dict(max_body_bytes=args.max_body_bytes, max_sequences=args.max_request_sequences)
    limits = ServerLimits(**{k: v for k, v in caps.items() if v is not None})
    check_cors(args)
    template = ChatTemplate(args.model if is_checkpoint(args.model) else None, args.chat_template)
    socks = bind(args.host, args.port)
    try:
        engine = engine_from_args(args)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    try:
        name = served_name(args)
        stats = engine.stats()
        cpu = f", {describe()}" if torch.device(engine.device).type == "cpu" else ""
        port = socks[0].getsockname()[1]  # the port bound: the kernel's choice for --port 0
        cors = f" (CORS: {', '.join(args.allowed_origins)})" if args.allowed_origins else ""
        print(f"hwattn serve: {name} ({engine.model_config.label}, TP={args.tp}, DP={args.dp}, "
              f"{stats['pages_total']} pages of {stats['page_size']} tokens, "
              f"{engine.kv_bytes_per_token} KV bytes/token/rank{cpu}, chat template: "
              f"{template.source}) on http://{url_host(args.host)}:{port}/v1"
              f"{' (API key required)' if api_key else ''}{cors}", flush=True)
        status = listen(build_app(AsyncEngine(engine), name, api_key=api_key, limits=limits,
                                  chat_template=template, protect_metrics=args.protect_metrics,
                                  allowed_origins=args.allowed_origins,
                                  allowed_methods=args.allowed_methods,
                                  allowed_headers=args.allowed_headers,
                                  allow_credentials=args.allow_credentials),
                        socks, args.log_level)
    finally:
        for sock in socks:
            sock.close()
        engine.shutdown()
    return status or 0

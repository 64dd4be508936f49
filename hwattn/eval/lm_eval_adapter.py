"""lm-evaluation-harness adapter: hwattn models as an `lm_eval` LM, and tasks from local JSONL.

    from hwattn.eval.lm_eval_adapter import HwattnLM, local_tasks, run_lm_eval
    lm = HwattnLM.from_checkpoint("runs/x/checkpoint")
    results = run_lm_eval(lm, {"my_cloze": "cloze.jsonl", "my_mc": "mc.jsonl"})

`local_tasks` (`hwattn.eval.lm_eval_tasks`, which shows the YAML) writes one task YAML per
JSONL file; `hwattn eval --data DIR --write-tasks OUT` writes the cloze and multiple-choice
items of a dataset with their YAML.

The model is registered with the harness as "hwattn", so its command line takes it:

    lm_eval --model hwattn --model_args pretrained=DIR,batch_size=16 --tasks NAME ...

(hwattn installs a start-up hook that registers the name when lm-eval loads; see
`hwattn_lm_eval_hook`). model_args: pretrained, batch_size, max_length, device, amp,
cpu_threads (default: 1 for small models, see `hwattn.cpu_threads`). The harness's own
`--device` (default cuda:0) is read as its `--model hf` reads it: a device this machine lacks
becomes CUDA if there is one, else the CPU.
"""

from __future__ import annotations

import logging
import tempfile
from numbers import Integral
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from hwattn.data.tokenizer import Tokenizer
from hwattn.eval.lm_eval_tasks import local_tasks
from hwattn.eval.perplexity import AMP_CHOICES, autocast_for
from hwattn.eval.tasks import encode_pair, loglikelihoods

log = logging.getLogger(__name__)


def _present(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None
                                              or device.index < torch.cuda.device_count())
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return True


def harness_device(device: str | None) -> str:
    """The harness's `--device` as lm-eval's `--model hf` reads it: the device if this machine
    has it, else "cuda" if it has CUDA, else "cpu" (so its default, cuda:0, runs on a CPU-only
    machine). None or "auto": "auto"."""
    if device in (None, "", "auto"):
        return "auto"
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if _present(wanted):
        return str(device)
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    log.warning("hwattn: device %r is not available here; using %s", device, chosen)
    return chosen


@register_model("hwattn")
class HwattnLM(LM):
    """Log-likelihoods and greedy generation of a hwattn `Transformer` for the harness."""

    def __init__(self, model=None, tokenizer: Tokenizer | None = None, pretrained: str | None = None,
                 batch_size: int = 16, max_length: int | None = None, device: str = "auto",
                 amp: str = "auto", cpu_threads: int | None = None):
        super().__init__()
        # Checked here, before a model loads, not where they are used: a batch_size below 1
        # scored nothing and returned log-likelihoods of 0.
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"hwattn model_args: batch_size must be an integer >= 1, got "
                             f"{batch_size!r}")
        if amp not in AMP_CHOICES:  # `autocast_for` reads any other value as fp32
            raise ValueError(f"hwattn model_args: amp must be one of {AMP_CHOICES}, got {amp!r}")
        # What only loading a checkpoint reads was dropped without a word beside a loaded
        # model (the model stayed on its device, the checkpoint was not read), and a tokenizer
        # beside pretrained= was replaced by the checkpoint's.
        if model is not None:
            ignored = [name for name, value in (("pretrained", pretrained),
                                                ("cpu_threads", cpu_threads)) if value is not None]
            ignored += ["device"] if device not in (None, "auto") else []
            if ignored:
                raise ValueError(f"HwattnLM: {', '.join(ignored)} cannot be given with a model "
                                 "(it is used as it is, on its device and threads)")
        elif tokenizer is not None:
            raise ValueError("HwattnLM: tokenizer cannot be given with pretrained= (the "
                             "checkpoint's own tokenizer is used)")
        if model is None:
            if pretrained is None:
                raise ValueError("HwattnLM needs a model or pretrained=<checkpoint dir>")
            from hwattn.cpu_threads import set_cpu_threads, use_default_cpu_threads
            from hwattn.device import resolve_device
            from hwattn.models.checkpoint import load_model

            where = resolve_device(device)
            if not _present(where):
                raise ValueError(f"device {device!r} is not available on this machine (CUDA "
                                 f"available: {torch.cuda.is_available()}); give device=cpu")
            model = load_model(pretrained, device=where)
            tokenizer = Tokenizer.load(pretrained)
            if cpu_threads is not None:
                set_cpu_threads(cpu_threads)
            use_default_cpu_threads(model.num_params(), model.tok_embeddings.weight.device)
        if tokenizer is None:
            raise ValueError("HwattnLM needs the tokenizer the model was trained with")
        # A max_length of 0 fell back to the model's context, one beyond it failed inside the
        # model ("position ... exceeds max_seq_len").
        context = model.config.max_seq_len
        if max_length is not None and (isinstance(max_length, bool)
                                       or not isinstance(max_length, Integral)
                                       or not 1 <= max_length <= context):
            raise ValueError(f"hwattn model_args: max_length must be an integer from 1 to the "
                             f"model's context of {context} tokens (max_seq_len), got "
                             f"{max_length!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = context if max_length is None else int(max_length)
        self.amp = amp

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "HwattnLM":
        return cls(pretrained=str(path), **kwargs)

    # What `lm_eval --model_args` may set, and how to read each value given as text.
    ARGS = {"pretrained": str, "batch_size": int, "max_length": int, "device": str, "amp": str,
            "cpu_threads": int}

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """From `--model_args` (a dict) plus the harness's `--batch_size` / `--device`."""
        args = dict(arg_dict)
        for key in ("batch_size", "device"):
            value = (additional_config or {}).get(key)
            if value is not None and key not in args:
                args[key] = harness_device(value) if key == "device" else value
        if str(args.get("batch_size", "")).startswith("auto"):
            args.pop("batch_size")  # the harness's batch-size search; ours is a fixed size
        unknown = sorted(set(args) - set(cls.ARGS))
        if unknown:
            raise ValueError(f"hwattn model_args: unknown {unknown}; known {sorted(cls.ARGS)}")
        try:
            args = {k: cls.ARGS[k](v) for k, v in args.items() if v is not None}
        except ValueError as err:
            raise ValueError(f"hwattn model_args: {err}") from None
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """From `--model_args` written as "key=value,key=value"."""
        pairs = [kv.split("=", 1) for kv in arg_string.split(",") if kv]
        bad = [kv[0] for kv in pairs if len(kv) != 2]
        if bad:
            raise ValueError(f"hwattn model_args: expected key=value, got {bad}")
        return cls.create_from_arg_obj(dict(pairs), additional_config)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each request's continuation given its context, the
        pair split into tokens as the harness's `--model hf` splits it (`encode_pair`); a
        context of no tokens is <|endoftext|>."""
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            pairs.append((ctx or [self.tokenizer.eot_id], cont))
        return loglikelihoods(self.model, pairs, self.max_length, self.batch_size, self.amp)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood, in windows of max_length that each condition on the
        previous window's tokens (the first token is conditioned on <|endoftext|>)."""
        out = []
        for req in requests:
            ids = [self.tokenizer.eot_id] + self.tokenizer.encode(req.args[0])
            total, pos = 0.0, 1
            while pos < len(ids):
                end = min(len(ids), pos + self.max_length)
                start = max(0, end - self.max_length - 1)
                ctx, cont = ids[start:pos], ids[pos:end]
                total += loglikelihoods(self.model, [(ctx, cont)], self.max_length, 1, self.amp)[0][0]
                pos = end
            out.append(total)
        return out

    # lm-eval's names for the number of tokens to generate, first found wins (as its
    # `normalize_gen_kwargs` reads them).
    MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each request's context, cut at the first of its `until`
        strings (the string itself dropped) or <|endoftext|>, at most `max_gen_toks` tokens
        (default 64). The context keeps its last max_length - max_gen_toks tokens; a
        max_gen_toks of max_length or more, or sampling (do_sample, temperature > 0), is
        refused."""
        out = []
        for req in requests:
            context, gen = req.args
            until = gen.get("until", []) or []
            until = [until] if isinstance(until, str) else list(until)
            until = [u for u in until if u]  # lm-eval skips '' (it would stop at once)
            given = [gen[k] for k in self.MAX_TOKEN_KEYS if gen.get(k) is not None]
            max_new = int(given[0]) if given else 64
            if max_new >= self.max_length:  # no room left for the context (`--model hf` asserts)
                raise ValueError(f"hwattn: max_gen_toks {max_new} leaves no room for the context "
                                 f"in max_length {self.max_length}; give max_gen_toks below "
                                 f"{self.max_length} or a larger max_length")
            temperature = float(gen.get("temperature", 0.0) or 0.0)
            if gen.get("do_sample", temperature > 0):
                raise ValueError(f"hwattn generates greedily: sampling (do_sample="
                                 f"{gen.get('do_sample')}, temperature={temperature}) is not "
                                 f"supported")
            ids = self.tokenizer.encode(context)[-(self.max_length - max_new):] or [self.tokenizer.eot_id]
            x = torch.tensor([ids], device=self.device)
            new = []
            for _ in range(max_new):
                with autocast_for(self.device, self.amp):
                    nxt = int(self.model(x[:, -self.max_length:])[0, -1].argmax())
                if nxt == self.tokenizer.eot_id:
                    break
                new.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=self.device)], 1)
                text = self.tokenizer.decode(new)
                if any(u in text for u in until):
                    break
            text = self.tokenizer.decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def run_lm_eval(lm: HwattnLM, tasks: dict[str, str | Path], limit: int | None = None) -> dict:
    """Run the harness on local JSONL tasks; returns {task: {metric: value}}.

    Point estimates only: the harness's bootstrap standard errors are not computed
    (`bootstrap_iters=0`). They would be dropped here anyway, and the bootstrap forks a process
    pool, which hung a test process that already ran torch and tqdm threads (CI, 2026-12-04)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(local_tasks(tasks, tmp)))
        res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              log_samples=False, verbosity="ERROR", bootstrap_iters=0)
    return {name: {k.split(",")[0]: v for k, v in vals.items()
                   if isinstance(v, (int, float)) and not k.endswith("_stderr,none")}
            for name, vals in res["results"].items()}

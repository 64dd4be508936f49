"""`LLM`: the offline, vLLM-style entry point.

    from hwattn import LLM, SamplingParams
    llm = LLM("tiny", attention="gla-2", seed=0)                   # preset, random weights
    llm = LLM("runs/gla/ckpt", speculative="ngram", num_speculative_tokens=3)
    for out in llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, n=2)):
        for completion in out.outputs:                              # n completions each
            print(completion.text, completion.token_ids, completion.finish_reason)
    llm.chat([{"role": "user", "content": "Hello"}])               # the checkpoint's template

vLLM's everyday arguments are taken where they mean something here (`VLLM_ARGUMENTS`), and
any other argument is refused by name with a ValueError.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from pathlib import Path

import torch

from hwattn.cpu_threads import set_cpu_threads, use_default_cpu_threads
from hwattn.data.tokenizer import load_tokenizer
from hwattn.device import check_device
from hwattn.engine.config import EngineConfig
from hwattn.engine.chat import ChatTemplate, chat_options
from hwattn.engine.data_parallel import DataParallelEngine
from hwattn.engine.block_manager import plan_pages
from hwattn.engine.llm_engine import LLMEngine
from hwattn.engine.loader import build_model, is_checkpoint, model_config, resolve_device, resolve_dtype
from hwattn.engine.model_runner import ModelRunner, compose_absorptions_for_serving
from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.sequence import RequestOutput
from hwattn.engine.speculative import DraftModelDrafter, NgramDrafter
from hwattn.engine.tp_executor import TensorParallelExecutor
from hwattn.models import Transformer
from hwattn.parallel.errors import summarize

log = logging.getLogger(__name__)

# vLLM `LLM(...)` arguments hwattn takes under another name or as a note, with what each does
# here (`vllm_arguments` applies them; docs/engine.md's table of vLLM's arguments repeats this).
VLLM_ARGUMENTS = {
    "block_size": "page_size (tokens per KV page)",
    "enforce_eager": "enforce_eager=True is cuda_graphs=False, compile_decode=False, "
                     "compile_prefill=False and prefill_graphs=False",
    "trust_remote_code": "accepted and ignored: the engine runs hwattn's own model code and "
                         "never executes code from the checkpoint folder",
    "swap_space": "accepted and ignored: preempted sequences are recomputed, never swapped to "
                  "host memory, so no swap space is allocated",
}
# vLLM arguments accepted only at the value that asks for nothing hwattn lacks.
VLLM_DEFAULTS = {"tokenizer_mode": "auto", "revision": None, "tokenizer_revision": None,
                 "quantization": None, "cpu_offload_gb": 0, "kv_cache_dtype": "auto"}
ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


def vllm_arguments(kwargs: dict) -> dict:
    """`kwargs` with vLLM's argument names (`VLLM_ARGUMENTS`, `VLLM_DEFAULTS`) turned into
    `EngineConfig` fields. ValueError naming any argument that neither maps nor is a field."""
    kwargs = dict(kwargs)
    for name in ("trust_remote_code", "enforce_eager"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            raise ValueError(f"{name} must be True or False, got {kwargs[name]!r}")
    kwargs.pop("trust_remote_code", None)
    if "swap_space" in kwargs:
        space = kwargs.pop("swap_space")
        if isinstance(space, bool) or not isinstance(space, numbers.Real) or not space >= 0:
            raise ValueError(f"swap_space must be a number of GiB >= 0, got {space!r}")
    if "enforce_eager" in kwargs:
        eager = kwargs.pop("enforce_eager")
        switches = ("cuda_graphs", "compile_decode", "compile_prefill", "prefill_graphs")
        for name in switches:
            if kwargs.get(name) not in (True, False, None):  # ("no" is not a contradiction)
                raise ValueError(f"{name} must be True or False, got {kwargs[name]!r}")
            if eager and kwargs.get(name):
                raise ValueError(f"enforce_eager=True contradicts {name}=True; give one of them")
        if eager:
            kwargs.update(dict.fromkeys(switches, False))
    if "block_size" in kwargs:
        block = kwargs.pop("block_size")
        if kwargs.get("page_size", block) != block:
            raise ValueError(f"block_size={block!r} and page_size={kwargs['page_size']!r} differ; "
                             f"they are the same setting, give one")
        kwargs["page_size"] = block
    for name, nothing in VLLM_DEFAULTS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value != nothing:
                raise ValueError(f"{name}={value!r} is not supported by hwattn's LLM (only "
                                 f"{nothing!r})")
    unknown = sorted(set(kwargs) - ENGINE_FIELDS)
    if unknown:
        raise ValueError(f"LLM got unknown argument{'s' * (len(unknown) > 1)} "
                         f"{', '.join(unknown)}; it takes EngineConfig's fields, cpu_threads "
                         f"and vLLM's {', '.join(sorted(VLLM_ARGUMENTS))} (docs/engine.md)")
    return kwargs


def create_engine(config: EngineConfig | str | None = None, **kwargs):
    """Build what `config` describes (an `EngineConfig`, or a model name with the
    `EngineConfig` fields as keywords): the model (sharded over `tensor_parallel_size`
    ranks), its tokenizer, page pool, scheduler and drafter, as an `LLMEngine`, or with
    `data_parallel_size` > 1 a `DataParallelEngine` over that many replicas of it."""
    if not isinstance(config, EngineConfig):
        config = EngineConfig(**kwargs) if config is None else EngineConfig(model=config, **kwargs)
    elif kwargs:
        raise ValueError(f"give an EngineConfig or keywords, not both (got {sorted(kwargs)})")
    if config.model is None:
        raise ValueError("model must be a checkpoint directory or a preset name, got None")
    check_device(config.device)
    dev = resolve_device(config.device)
    if dev.type not in ("cpu", "cuda"):  # the engine runs on these alone
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                         f"{config.device!r}")
    dt = resolve_dtype(config.dtype, dev)
    model_cfg = model_config(config.model, config.attention, config.model_overrides)
    max_len = config.max_model_len or model_cfg.max_seq_len
    if max_len > model_cfg.max_seq_len:
        raise ValueError(f"max_model_len {max_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    # Resolved once here, so that every rank and replica builds the same engine.
    config = dataclasses.replace(config, dtype=dt, device=str(dev), max_model_len=max_len)
    checkpoint = config.model if is_checkpoint(config.model) else None
    tokenizer = load_tokenizer(checkpoint, model_cfg.vocab_size, config.tokenizer)
    # Checked here, before any rank or replica process starts (each would fail on its own).
    tp = config.tensor_parallel_size
    if tp > 1:
        try:
            Transformer(model_cfg, device="meta").layers[0].attn.local_heads(tp)
        except ValueError as err:
            raise ValueError(f"tensor_parallel_size {tp} does not split {model_cfg.label}: "
                             f"{err}") from None
    drafting = config.speculative and config.speculative != "ngram"
    if drafting:
        if not is_checkpoint(config.speculative):
            raise ValueError(f"speculative must be None, 'ngram' or a draft checkpoint directory, "
                             f"got {config.speculative!r}")
        if tp > 1:
            raise ValueError("a draft model cannot be combined with tensor_parallel_size > 1; "
                             "use speculative='ngram'")
        draft_cfg = model_config(config.speculative)
        if draft_cfg.vocab_size != model_cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_cfg.vocab_size}) "
                             f"differs from the target's ({model_cfg.vocab_size})")
        if draft_cfg.max_seq_len < max_len:  # it drafts up to the context's end
            raise ValueError(f"the draft model's context (max_seq_len "
                             f"{draft_cfg.max_seq_len}) is shorter than max_model_len "
                             f"{max_len}: lower max_model_len to at most "
                             f"{draft_cfg.max_seq_len}")
    overridden = config.overridden_by_num_pages()
    if overridden:  # as vLLM logs that num_gpu_blocks_override overrides its memory plan
        given = ", ".join(f"{name}={value!r}" for name, value in overridden.items())
        log.warning("num_pages=%d overrides %s: the KV cache gets %d pages whatever the memory "
                    "(leave num_pages out to size it from %s)", config.num_pages, given,
                    config.num_pages, " or ".join(overridden))
    if config.data_parallel_size > 1:
        # Without the settings num_pages overrides, so that no replica warns again.
        replica = dataclasses.replace(config, data_parallel_size=1,
                                      **{name: None for name in overridden})
        return DataParallelEngine(config.data_parallel_size, replica.as_kwargs(), model_cfg,
                                  tokenizer)
    draft_model = None
    if drafting:
        draft_model = build_model(config.speculative, dtype=dt, device=dev, seed=config.seed)
        compose_absorptions_for_serving(draft_model)  # (before the cache is sized, as below)

    def pages(model_) -> int:
        per_token = model_.kv_bytes_per_token(1, dt)  # this rank's real layout
        if draft_model is not None:
            per_token += draft_model.kv_bytes_per_token(1, dt)
        return plan_pages(config, per_token, dev, max_len)

    k = config.num_speculative_tokens
    graph_lens = (1, k + 1) if k else (1,)
    runner_kwargs = dict(page_size=config.page_size, max_model_len=max_len + k + 1,
                         max_num_seqs=config.max_num_seqs, cache_dtype=dt, backend=config.backend,
                         mixed_steps=config.enable_mixed_batches and not k,
                         cuda_graphs=config.cuda_graphs, graph_query_lens=graph_lens,
                         compile_decode=(dev.type == "cuda" if config.compile_decode is None
                                         else bool(config.compile_decode)),
                         compile_prefill=(dev.type == "cuda" if config.compile_prefill is None
                                          else bool(config.compile_prefill)),
                         prefill_graphs=config.prefill_graphs,
                         max_num_batched_tokens=config.max_num_batched_tokens)
    build = dict(model=config.model, attention=config.attention, dtype=dt, device=str(dev),
                 seed=config.seed, overrides=config.model_overrides)
    if config.tensor_parallel_size > 1:
        runner = TensorParallelExecutor(config.tensor_parallel_size, build, runner_kwargs, config,
                                        max_len)
        net, n_pages, kv_bytes = None, runner.num_pages, runner.kv_bytes_per_token
    else:
        net = build_model(**build)
        compose_absorptions_for_serving(net)  # (its weights count before the cache is sized)
        n_pages = pages(net)
        runner = ModelRunner(net, num_pages=n_pages, **runner_kwargs)
        kv_bytes = net.kv_bytes_per_token(1, dt)
    drafter = None
    if config.speculative == "ngram":
        drafter = NgramDrafter(k)
    elif draft_model is not None:
        drafter = DraftModelDrafter(draft_model, k, n_pages, config.page_size, max_len + k + 1,
                                    config.backend, config.max_num_batched_tokens)
    return LLMEngine(runner, tokenizer, model_cfg, config, n_pages, drafter,
                     kv_bytes_per_token=kv_bytes, model=net, dtype=dt)


class LLM:
    """Offline generation with continuous batching over a paged KV cache.

    Args:
        model: a checkpoint directory (config.json + model.safetensors [+ tokenizer.json]) or
            a preset name (tiny, mini, small, medium, large, xl) with seeded random weights.
        attention: variant label for presets ("gla-2", "gqa-4", "mla", ...); default mha.
        dtype: "bf16" | "fp16" | "half" | "fp32" | "float" | "fp64" | "auto" (bf16 on CUDA,
            fp32 on CPU).
        device: "cuda", "cpu", "cuda:1", or "auto".
        tensor_parallel_size: ranks to shard over (worker processes; gloo on CPU, NCCL on
            GPUs). The weights live in the workers; this process keeps the scheduler.
        data_parallel_size: replicas, each in its own process with `tensor_parallel_size`
            ranks on its own GPUs; requests go to the one with the least outstanding tokens.
        page_size (or vLLM's block_size): tokens per KV page (default 64).
        max_num_seqs: sequences decoded together at most.
        memory_budget: KV-cache bytes per rank, or a fraction of free GPU memory.
        gpu_memory_utilization: instead, the fraction of each GPU's whole memory the engine
            may fill (weights and all else on it counted; the KV cache takes the rest). On the
            CPU it is refused: give memory_budget in bytes.
        speculative: None, "ngram" (prompt lookup) or a draft-model checkpoint directory.
        num_speculative_tokens: k drafts verified per step.
        speculative_disable_batch_size (a keyword, as every other `EngineConfig` field): a
            step that starts with this many running sequences or more decodes plainly,
            overlapped with the host, instead of verifying drafts (default None: always).
        seed: weights of presets, and the seeds of requests that bring none.
        tokenizer: a local tokenizer.json (or a folder holding one) to use instead of the
            checkpoint's; its ids must fit the model's vocabulary.
        cpu_threads: torch CPU threads for this process (and its workers). Default, as every
            `hwattn` command: OMP_NUM_THREADS if set, else 1 for models under 20M parameters
            and the idle cores otherwise (`hwattn.cpu_threads`); applied with
            `torch.set_num_threads` when the model runs on the CPU.
        Other keywords: any field of `EngineConfig` (max_num_batched_tokens, num_pages,
        max_model_len, cuda_graphs, enable_prefix_caching, backend, model_overrides), and
        vLLM's `enforce_eager`, `trust_remote_code` and `swap_space` (`VLLM_ARGUMENTS`).
        Anything else raises ValueError naming it.
    """

    def __init__(self, model: str, attention: str | None = None, dtype="auto", device="auto",
                 tensor_parallel_size: int = 1, page_size: int | None = None,
                 max_num_seqs: int = 64, memory_budget=None, speculative: str | None = None,
                 num_speculative_tokens: int = 3, seed: int = 0, data_parallel_size: int = 1,
                 tokenizer: str | None = None, cpu_threads: int | None = None, **kwargs):
        if page_size is not None:
            kwargs["page_size"] = page_size
        kwargs = vllm_arguments(kwargs)
        config = EngineConfig(model=model, attention=attention, dtype=dtype, device=device,
                              tensor_parallel_size=tensor_parallel_size,
                              max_num_seqs=max_num_seqs, memory_budget=memory_budget,
                              speculative=speculative,
                              num_speculative_tokens=num_speculative_tokens, seed=seed,
                              data_parallel_size=data_parallel_size, tokenizer=tokenizer,
                              **kwargs)
        # Chat templates come from the tokenizer's folder, as transformers keeps them.
        self._model_dir = model if is_checkpoint(model) else None
        if tokenizer is not None and Path(tokenizer).is_dir():
            self._model_dir = tokenizer
        self._templates: dict[str | None, ChatTemplate] = {}
        # Before the engine starts its workers, which split this process's thread count.
        self.cpu_threads = apply_cpu_threads(config, cpu_threads)
        self.engine = create_engine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """The engine's tokenizer (vLLM's `LLM.get_tokenizer`): `encode(text) -> ids`,
        `decode(ids) -> text`, `eos_token_id`, `vocab_size`. It is hwattn's own wrapper (or a
        byte tokenizer for presets), not a transformers tokenizer."""
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order.

        prompts: a string, a list of token ids, a 1-D integer tensor of ids, a vLLM prompt
            dict ({"prompt": text} or {"prompt_token_ids": ids}), or a list of any of these
            (a 2-D integer tensor is one prompt per row).
        sampling_params: one for all prompts, or one per prompt.

        All or nothing: every prompt and params is checked before any is queued, so a
        ValueError (naming the bad prompt's index) runs nothing and leaves nothing behind. A
        request that fails inside the engine comes back alone with finish_reason "error".
        """
        prompts = _prompt_list(prompts)
        return self._run(prompts, sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or several (a list
        of such lists); outputs come back in order.

        The prompt is rendered with `chat_template` (a template file or Jinja string) if
        given, else the checkpoint's tokenizer_config.json template, else the built-in one
        (`hwattn.engine.chat.ChatTemplate`), and tokenized so that message content never
        becomes a special token or a turn marker. As in vLLM:

        add_generation_prompt: end the prompt with the opening of the assistant's turn.
        continue_final_message: end the prompt right after the final message's content,
            with nothing after it (no end of turn), so that the model continues that message
            (a partial assistant answer, say). Needs add_generation_prompt=False.
        chat_template_kwargs: extra variables for the template (a dict of JSON-like values;
            none may set the template's own, such as `messages` or `bos_token`).
        tools: tool calling is not supported; only None (or []) is accepted.

        A bad message, argument or template raises ValueError naming it, before anything
        runs."""
        if tools is not None and tools != []:
            raise ValueError("tools: tool calling is not supported by hwattn's LLM.chat "
                             "(give tools=None)")
        # Checked once for all conversations, before any is rendered.
        chat_options(add_generation_prompt, continue_final_message, chat_template_kwargs)
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            conversations = [messages]
        elif isinstance(messages, list) and messages and all(isinstance(c, list) for c in messages):
            conversations = messages
        else:
            raise ValueError("messages must be a list of {role, content} messages or a list of "
                             "such lists (one per conversation)")
        if chat_template not in self._templates:
            self._templates[chat_template] = ChatTemplate(self._model_dir, chat_template)
        template = self._templates[chat_template]
        prompts, texts = [], []
        for i, conversation in enumerate(conversations):
            try:
                # Token ids, built piece by piece: no message can produce a special token or
                # a turn marker (`ChatTemplate.encode`); the text from the same rendering.
                ids, text = template.encode_with_text(
                    conversation, self.tokenizer, add_generation_prompt,
                    continue_final_message=continue_final_message,
                    chat_template_kwargs=chat_template_kwargs)
                prompts.append(ids)
                texts.append(text)
            except ValueError as err:
                where = f"conversation {i}: " if len(conversations) > 1 else ""
                raise ValueError(f"{where}{err}") from None
        outputs = self._run(prompts, sampling_params, use_tqdm)
        for out, text in zip(outputs, texts):
            out.prompt = text
        return outputs

    def _run(self, prompts: list, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        # Only finished outputs are read here: the engine need not build the others.
        final = {}
        if isinstance(sampling_params, (list, tuple)):
            params = [_final_only(p, final) for p in sampling_params]
        else:
            params = [_final_only(sampling_params, final)] * len(prompts)
        engine = self.engine
        ids = engine.add_requests(prompts, params)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
            except ImportError:
                bar = None
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in ids]

    def shutdown(self) -> None:
        """Stop the worker processes (tensor-parallel ranks, data-parallel replicas); a no-op
        on one in-process rank. Bounded in time; raises a worker's error at shutdown. Dropping
        the last reference to the `LLM` stops them too (without waiting for them to finish)."""
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """Shut down. When the block raised, its error is the one that propagates: a
        shutdown failing as well is logged and noted on it, never put in its place."""
        if exc is None:
            self.shutdown()
            return
        try:
            self.shutdown()
        except Exception as err:  # noqa: BLE001 - the block's error comes first
            log.warning("LLM.shutdown() failed while the with block's %s propagated: %s",
                        type(exc).__name__, summarize(err), exc_info=err)
            exc.add_note(f"LLM.shutdown() failed too: {summarize(err)}")


def _final_only(params, done: dict):
    """`params` asking for its final output only (a copy; one per distinct object, kept in
    `done`). Anything but a valid `SamplingParams` stays as it is, for the engine's checks
    to name the prompt it came with."""
    if not isinstance(params, SamplingParams) or params.output_kind == "final_only":
        return params
    if id(params) not in done:
        try:
            done[id(params)] = dataclasses.replace(params, output_kind="final_only")
        except ValueError:  # a field set to a bad value after construction
            done[id(params)] = params
    return done[id(params)]


def apply_cpu_threads(config: EngineConfig, cpu_threads: int | None) -> int:
    """Set torch's CPU threads as every `hwattn` command does: `cpu_threads` if given, else
    OMP_NUM_THREADS if set, else `hwattn.cpu_threads.default_threads` for the model's size
    (when it runs on the CPU). Returns the thread count in effect."""
    if cpu_threads is not None:
        if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, numbers.Integral):
            raise ValueError(f"cpu_threads must be an integer >= 1, got {cpu_threads!r}")
        return set_cpu_threads(int(cpu_threads))
    device = resolve_device(config.device)
    if device.type != "cpu":
        return torch.get_num_threads()
    shape = model_config(config.model, config.attention, config.model_overrides)
    return use_default_cpu_threads(Transformer(shape, device="meta").num_params(), device)


# The keys of vLLM's TextPrompt / TokensPrompt dicts, and what hwattn does with them.
PROMPT_KEYS = ("prompt", "prompt_token_ids")


def _prompt_of_dict(prompt: dict, where: str):
    """A vLLM prompt dict as the text or token ids it holds."""
    extra = sorted(set(prompt) - set(PROMPT_KEYS))
    if extra:
        raise ValueError(f"{where}: prompt dict key{'s' * (len(extra) > 1)} {extra} not "
                         f"supported; give {{'prompt': text}} or {{'prompt_token_ids': ids}}")
    given = [k for k in PROMPT_KEYS if k in prompt]
    if len(given) != 1:
        raise ValueError(f"{where}: a prompt dict needs exactly one of {list(PROMPT_KEYS)}, "
                         f"got {sorted(prompt)}")
    value = prompt[given[0]]
    if given[0] == "prompt" and not isinstance(value, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(value).__name__}")
    if given[0] == "prompt_token_ids" and not isinstance(value, (list, tuple, torch.Tensor)):
        raise ValueError(f"{where}: 'prompt_token_ids' must be a list of token ids, got "
                         f"{type(value).__name__}")
    return list(value) if isinstance(value, tuple) else value


def _prompt_list(prompts) -> list:
    """`LLM.generate`'s prompts as a list of single prompts (texts, id lists or tensors)."""
    if isinstance(prompts, dict):
        return [_prompt_of_dict(prompts, "prompts")]
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            return [prompts]
        if prompts.dim() == 2:
            return list(prompts)
        raise ValueError(f"prompts as a tensor must be 1-D (one prompt's token ids) or 2-D (one "
                         f"prompt per row), got shape {tuple(prompts.shape)}")
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                           for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return [_prompt_of_dict(p, f"prompts[{i}]") if isinstance(p, dict) else p
                for i, p in enumerate(prompts)]
    raise ValueError(f"prompts must be a string, a list of token ids, an integer tensor, a "
                     f"prompt dict or a list of these, got {type(prompts).__name__}")

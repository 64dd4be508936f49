"""vLLM's everyday arguments: what maps onto hwattn is taken (block_size, enforce_eager, dtype
"half", tokenizer, prompt dicts, max_tokens=None, skip_special_tokens, get_tokenizer), what
means nothing here is accepted as such (trust_remote_code, swap_space), and the rest is
refused by name with a ValueError."""

from __future__ import annotations

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.llm import vllm_arguments

SMALL = dict(device="cpu", max_model_len=64, num_pages=12, max_num_seqs=4, cpu_threads=1)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", attention="gqa-4", page_size=8, **SMALL)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_vllm_engine_arguments_map_onto_the_engine_config():
    llm = LLM("tiny", attention="gla-2", block_size=16, enforce_eager=True, trust_remote_code=True,
              swap_space=4, dtype="half", tokenizer_mode="auto", quantization=None, **SMALL)
    config = llm.engine.config
    assert (config.page_size, config.cuda_graphs, config.dtype) == (16, False, torch.float16)
    # vLLM's eager mode: no graphs, no compilation
    assert config.compile_decode is False and config.compile_prefill is False
    assert config.prefill_graphs is False
    assert next(llm.engine.model.parameters()).dtype == torch.float16
    out = llm.generate([[1, 2, 3]], greedy(3))[0]
    assert len(out.token_ids) == 3
    assert LLM("tiny", enforce_eager=False, **SMALL).engine.config.cuda_graphs is True


@pytest.mark.parametrize("kwargs, match", [
    ({"quantization": "awq"}, "quantization='awq' is not supported"),
    ({"cpu_offload_gb": 4}, "cpu_offload_gb"),
    ({"hf_overrides": {}}, "unknown argument hf_overrides"),
    ({"load_format": "dummy", "task": "generate"}, "unknown arguments load_format, task"),
    ({"block_size": 16, "page_size": 32}, "block_size=16 and page_size=32 differ"),
    ({"enforce_eager": True, "cuda_graphs": True}, "contradicts cuda_graphs"),
    ({"enforce_eager": True, "compile_decode": True}, "contradicts compile_decode"),
    ({"enforce_eager": True, "compile_prefill": True}, "contradicts compile_prefill"),
    ({"enforce_eager": True, "prefill_graphs": True}, "contradicts prefill_graphs"),
    ({"enforce_eager": "yes"}, "enforce_eager must be True or False"),
    ({"enforce_eager": True, "prefill_graphs": "no"}, "prefill_graphs must be True or False"),
    ({"trust_remote_code": 1}, "trust_remote_code must be True or False"),
    ({"swap_space": -1}, "swap_space must be a number"),
])
def test_arguments_that_do_not_map_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vllm_arguments(kwargs)


def test_llm_refuses_an_unknown_argument_with_a_value_error_naming_it():
    with pytest.raises(ValueError, match="unknown argument max_loras"):
        LLM("tiny", max_loras=2, **SMALL)
    with pytest.raises(ValueError, match="tokenizer must be a local tokenizer.json"):
        LLM("tiny", tokenizer="gpt2", **SMALL)


def test_prompt_dicts_are_vllm_text_and_tokens_prompts(llm):
    plain = llm.generate(["Hello", [5, 6, 7]], greedy(4))
    dicts = llm.generate([{"prompt": "Hello"}, {"prompt_token_ids": [5, 6, 7]}], greedy(4))
    assert [o.token_ids for o in dicts] == [o.token_ids for o in plain]
    one = llm.generate({"prompt_token_ids": [5, 6, 7]}, greedy(4))
    assert one[0].token_ids == plain[1].token_ids and one[0].prompt_token_ids == [5, 6, 7]
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt dict key \['multi_modal_data'\]"):
        llm.generate([{"prompt": "a"}, {"prompt": "b", "multi_modal_data": {}}], greedy(1))
    with pytest.raises(ValueError, match="exactly one of"):
        llm.generate({"prompt": "a", "prompt_token_ids": [1]}, greedy(1))
    with pytest.raises(ValueError, match="'prompt' must be a string"):
        llm.generate({"prompt": [1, 2]}, greedy(1))
    assert llm.engine.block_manager.num_used_pages == 0


def test_max_tokens_none_generates_up_to_the_context_limit(llm):
    out = llm.generate([[1, 2, 3, 4, 5]], greedy(None))[0]
    assert len(out.token_ids) == 64 - 5 and out.finish_reason == "length"
    assert SamplingParams(max_tokens=None, min_tokens=5).max_tokens is None
    with pytest.raises(ValueError, match="max_tokens must be an integer"):
        SamplingParams(max_tokens=0)


def test_get_tokenizer_is_the_engine_tokenizer(llm):
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer is llm.engine.tokenizer
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from hwattn.data.tokenizer import train_bpe

    text = ["It was the best of times, it was the worst of times."] * 20
    path = tmp_path_factory.mktemp("tok")
    train_bpe(text, 300, name="tiny-bpe").save(path)
    return path


def test_tokenizer_argument_and_skip_special_tokens(tokenizer_dir):
    llm = LLM("tiny", tokenizer=str(tokenizer_dir), **SMALL)
    tok = llm.get_tokenizer()
    assert 256 < tok.vocab_size <= 300 and tok.eot_id is not None
    assert llm.generate("It was the best", greedy(1))[0].prompt_token_ids == \
        tok.encode("It was the best")
    # Make <|endoftext|> the model's every choice, then keep generating past it.
    bias = torch.zeros(llm.engine.model_config.vocab_size)
    bias[tok.eot_id] = 1e4
    llm.engine.model.output.register_forward_hook(lambda module, args, out: out + bias)
    shown = llm.generate([[1, 2]], greedy(3, skip_special_tokens=False))[0]
    hidden = llm.generate([[1, 2]], greedy(3))[0]
    assert shown.token_ids == hidden.token_ids == [tok.eot_id] * 3
    assert shown.text == "<|endoftext|>" * 3 and hidden.text == ""
    with pytest.raises(ValueError, match="skip_special_tokens must be True or False"):
        SamplingParams(skip_special_tokens=None)
    with pytest.raises(ValueError, match="ids, more than the model's vocabulary"):
        LLM("tiny", tokenizer=str(tokenizer_dir), model_overrides={"vocab_size": 256}, **SMALL)


def test_serve_takes_vllm_flags():
    from hwattn.cli import build_parser
    from hwattn.cli.serve import engine_config

    parse = build_parser().parse_args
    args = parse(["serve", "tiny", "--trust-remote-code", "--enforce-eager",
                  "--enable-prefix-caching", "--block-size", "16"])
    args.model = "tiny"
    config = engine_config(args)
    assert (config.page_size, config.cuda_graphs, config.enable_prefix_caching) == (16, False, True)
    assert config.compile_decode is False and config.compile_prefill is False
    plain = engine_config(parse(["serve", "tiny", "--no-cuda-graphs"]))
    # compiled where CUDA is
    assert (plain.cuda_graphs, plain.compile_decode, plain.compile_prefill) == (False, None, None)
    eager = engine_config(parse(["serve", "tiny", "--no-compile"]))
    assert eager.compile_decode is False and eager.compile_prefill is False
    assert engine_config(parse(["serve", "tiny", "--no-prefill-graphs"])).prefill_graphs is False
    assert config.prefill_graphs is False and plain.prefill_graphs is True
    assert engine_config(parse(["serve", "tiny", "--no-mixed-batches"])).enable_mixed_batches is False
    assert plain.enable_mixed_batches is True  # mixed steps by default
    with pytest.raises(SystemExit):
        parse(["serve", "tiny", "--enable-prefix-caching", "--no-prefix-caching"])

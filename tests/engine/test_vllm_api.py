"""The offline API as vLLM users write it: `outputs[i]` completions, n per prompt, logprobs
and prompt_logprobs against the model's own forward, penalties / min_p / min_tokens through
the engine, stop strings kept on request, LLM.chat and gpu_memory_utilization."""

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from tests.engine.conftest import step_to_completion

PROMPT = [5, 17, 300, 42, 42, 7, 1000, 3]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("vllm") / "gla", "gla-2")
    torch.set_num_threads(1)
    return LLM(path, page_size=4, num_pages=300, max_num_seqs=8)


def dense_logprobs(model, ids):
    """(T, V) log-softmax of the model's logits over `ids`, without any cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def greedy_reference(model, prompt, n, penalize):
    """Greedy decoding written out: full forward each step, `penalize(logits, tokens so far)`."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].double()
        ids.append(int(penalize(logits, ids).argmax()))
    return ids[len(prompt):]


def test_outputs_hold_the_completion_and_flat_fields_alias_it(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    first = out.outputs[0]
    assert len(out.outputs) == 1 and first.index == 0
    assert (out.text, out.token_ids, out.finish_reason) == \
        (first.text, first.token_ids, first.finish_reason) == (first.text, first.token_ids, "length")
    assert first.logprobs is None and first.cumulative_logprob is None and out.prompt_logprobs is None


def test_n_completions_share_the_prompt_and_free_every_page(llm):
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    outs = step_to_completion(llm.engine, [PROMPT, PROMPT[:3]], params)
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2, 3]
        assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    again = llm.generate([PROMPT], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in outs[0].outputs]
    single = llm.generate([PROMPT], SamplingParams(max_tokens=8, seed=11, ignore_eos=True))[0]
    assert single.token_ids == outs[0].outputs[0].token_ids  # completion 0 keeps the seed
    assert llm.engine.block_manager.num_used_pages == 0


def test_aborting_or_failing_an_n_request_frees_all_its_sequences(llm):
    engine = llm.engine
    before = engine.stats()
    rid = engine.add_request(PROMPT, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    out = engine.abort_request(rid)
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    engine.check_invariants()
    assert engine.block_manager.num_used_pages == 0 and not engine.has_unfinished()
    rid = engine.add_request(PROMPT, SamplingParams(n=3, max_tokens=20, ignore_eos=True))
    engine.requests[rid][1].seed = 1 << 64  # this completion's sampling overflows int64
    bystander = engine.add_request(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
        engine.check_invariants()
    bad = outs[rid]
    assert bad.finish_reason == "error" and "Overflow" in bad.error
    assert [c.finish_reason for c in bad.outputs] == ["abort", "error", "abort"]
    assert outs[bystander].finish_reason == "length"
    stats = engine.stats()
    assert stats["failed"] == before["failed"] + 1 and stats["pages_used"] == 0


def test_logprobs_and_prompt_logprobs_are_the_models_own(llm):
    k = 3
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0.8, seed=2,
                                                logprobs=k, prompt_logprobs=2,
                                                ignore_eos=True))[0]
    ids = PROMPT + out.token_ids
    ref = dense_logprobs(llm.engine.model, ids)  # position p predicts token p + 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        entry = out.prompt_logprobs[p]
        assert entry[PROMPT[p]].logprob == pytest.approx(ref[p - 1, PROMPT[p]].item(), abs=1e-4)
        assert set(ref[p - 1].topk(2).indices.tolist()) <= set(entry)
    total = 0.0
    for j, (token, entry) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        row = ref[len(PROMPT) + j - 1]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        assert entry[token].decoded_token == llm.tokenizer.decode([token])
        assert set(row.topk(k).indices.tolist()) <= set(entry)
        total += entry[token].logprob
    assert out.outputs[0].cumulative_logprob == pytest.approx(total)


def test_penalties_steer_greedy_decoding_as_written_out(llm):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.8,
                            presence_penalty=0.7, frequency_penalty=0.4)
    n = len(PROMPT)

    def penalize(logits, ids):
        out = logits.clone()
        for t in set(ids):
            out[t] = out[t] / 1.8 if out[t] > 0 else out[t] * 1.8
        for t in set(ids[n:]):
            out[t] -= 0.4 * ids[n:].count(t) + 0.7
        return out

    got = llm.generate([PROMPT], params)[0].token_ids
    assert got == greedy_reference(llm.engine.model, PROMPT, 10, penalize)
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert plain[0].token_ids == greedy_reference(llm.engine.model, PROMPT, 10, lambda l, i: l)
    assert got != plain[0].token_ids  # the penalties did change something


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = llm.generate([PROMPT], greedy)[0].token_ids[0]
    stopped = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.outputs[0].stop_reason == first
    held = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[first], min_tokens=4))[0]
    assert len(held.token_ids) >= 4 and first not in held.token_ids[:4]


def test_stop_strings_can_stay_in_the_output(llm):
    text = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0,
                                                 ignore_eos=True))[0].text
    stop = text[3:5]
    cut = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                stop=[stop]))[0]
    kept = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                 stop=[stop], include_stop_str_in_output=True))[0]
    at = text.index(stop)
    assert cut.text == text[:at] and kept.text == text[:at + len(stop)]
    assert cut.outputs[0].stop_reason == kept.outputs[0].stop_reason == stop


def test_a_stop_token_is_kept_in_token_ids_and_left_out_of_the_text(llm):
    """Observed: a stop token id's text was written into the output text (only the
    end-of-sequence token was left out). vLLM's detokenizer leaves the token that stopped the
    output out of the text unless include_stop_str_in_output, and keeps its id either way."""
    greedy = dict(max_tokens=10, temperature=0, ignore_eos=True)
    base = llm.generate([PROMPT], SamplingParams(**greedy))[0].token_ids
    tok = llm.tokenizer
    at = next(i for i, t in enumerate(base)  # a token with text of its own, first seen there
              if i >= 2 and t >= 257 and t not in base[:i])
    stop = base[at]
    cut = llm.generate([PROMPT], SamplingParams(**greedy, stop_token_ids=[stop]))[0]
    kept = llm.generate([PROMPT], SamplingParams(**greedy, stop_token_ids=[stop],
                                                 include_stop_str_in_output=True))[0]
    assert cut.token_ids == kept.token_ids == base[:at + 1]
    assert cut.outputs[0].stop_reason == kept.outputs[0].stop_reason == stop
    assert tok.decode([stop]) and cut.text == tok.decode(base[:at])
    assert kept.text == tok.decode(base[:at + 1])


def test_stop_strings_without_detokenizing_are_refused_by_name(llm):
    """Stop strings are matched on the output text, which detokenize=False does not build:
    such a request ran to max_tokens past its stop string, the stop silently ignored. It is
    refused, as vLLM refuses it; without stop strings detokenize=False still runs."""
    with pytest.raises(ValueError, match="stop.*detokenize"):
        SamplingParams(max_tokens=12, stop=["ab"], detokenize=False)
    with pytest.raises(ValueError, match="stop.*detokenize"):
        SamplingParams(max_tokens=12, stop="ab", detokenize=False)
    bare = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                 detokenize=False, stop_token_ids=[7]))[0]
    assert bare.text == "" and 1 <= len(bare.token_ids) <= 5


def test_speculative_engines_decode_penalized_requests_plainly(tmp_path):
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "m", "gqa-2")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                            logprobs=1)
    plain = LLM(path, page_size=4, num_pages=100).generate([PROMPT], params)[0]
    spec = LLM(path, page_size=4, num_pages=100, speculative="ngram",
               num_speculative_tokens=2).generate([PROMPT], params)[0]
    assert spec.token_ids == plain.token_ids
    assert [e[t].logprob for t, e in zip(spec.token_ids, spec.outputs[0].logprobs)] == \
        pytest.approx([e[t].logprob for t, e in zip(plain.token_ids, plain.outputs[0].logprobs)],
                      abs=1e-5)


def test_chat_renders_conversations_with_the_template(llm, tmp_path):
    one = [{"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=3, temperature=0)
    outs = llm.chat([one, one + [{"role": "assistant", "content": "yo"}]], params)
    assert outs[0].prompt == "<|user|>\nhi\n<|assistant|>\n"
    assert outs[1].prompt.endswith("<|assistant|>\nyo\n<|assistant|>\n")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}bot:{% endif %}")
    out = llm.chat(one, params, chat_template=str(template))[0]
    assert out.prompt == "user: hi\nbot:"
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        llm.chat([{"role": "wizard", "content": "x"}], params)
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat(one, params, chat_template="no such file or template")


def test_gpu_memory_utilization_is_refused_on_the_cpu_by_name():
    with pytest.raises(ValueError, match="gpu_memory_utilization needs a CUDA device"):
        LLM("tiny", device="cpu", gpu_memory_utilization=0.5,
            model_overrides=dict(n_layers=1, max_seq_len=64))
    with pytest.raises(ValueError, match="gpu_memory_utilization must be a fraction"):
        LLM("tiny", device="cpu", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="not both"):
        LLM("tiny", device="cpu", gpu_memory_utilization=0.5, memory_budget=1 << 20)


def test_an_error_in_a_with_block_is_not_masked_by_a_failing_shutdown(monkeypatch, caplog):
    """Observed: `with LLM(...) as llm:` whose body raised, and whose shutdown then raised too
    (a worker's error at shutdown), propagated the shutdown's error: the body's was left in
    its `__context__`. Now the body's error propagates, with a note naming the shutdown's
    failure (logged in full); without an error in the body, shutdown's error is raised."""
    kw = dict(device="cpu", num_pages=40, model_overrides=dict(n_layers=1, max_seq_len=64))

    def failing_shutdown():
        raise RuntimeError("a worker failed at shutdown")

    with pytest.raises(KeyError, match="the body's error") as info:
        with LLM("tiny", **kw) as llm:
            monkeypatch.setattr(llm.engine, "shutdown", failing_shutdown)
            raise KeyError("the body's error")
    assert any("LLM.shutdown() failed too: RuntimeError: a worker failed at shutdown" in note
               for note in getattr(info.value, "__notes__", [])), info.value
    assert any("a worker failed at shutdown" in r.getMessage() and r.exc_info
               for r in caplog.records)
    with pytest.raises(RuntimeError, match="a worker failed at shutdown"):
        with LLM("tiny", **kw) as llm:
            monkeypatch.setattr(llm.engine, "shutdown", failing_shutdown)
    with LLM("tiny", **kw) as llm:  # nothing failing: nothing said
        assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].finished


def test_final_only_requests_get_one_output_when_every_completion_is_done(llm):
    """output_kind="final_only" (vLLM's FINAL_ONLY): no output while a request runs, then the
    same final output a cumulative request ends with; `generate` asks for it on a copy."""
    engine = llm.engine
    params = dict(max_tokens=5, temperature=0.8, seed=3, n=2, ignore_eos=True)
    final = engine.add_request(PROMPT, SamplingParams(**params, output_kind="final_only"))
    cumulative = engine.add_request(PROMPT, SamplingParams(**params))
    seen = {final: [], cumulative: []}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen[final]) == 1 and seen[final][0].finished
    assert len(seen[cumulative]) > 2 and not seen[cumulative][0].finished
    assert [o.token_ids for o in seen[final][0].outputs] == \
        [o.token_ids for o in seen[cumulative][-1].outputs]
    assert engine.block_manager.num_used_pages == 0
    mine = SamplingParams(max_tokens=3, temperature=0)
    assert llm.generate([PROMPT], mine)[0].finished and mine.output_kind == "cumulative"
    with pytest.raises(ValueError, match="output_kind must be one of cumulative, delta, "
                                         "final_only"):
        SamplingParams(output_kind="final")

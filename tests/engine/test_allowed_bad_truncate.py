"""vLLM's `allowed_token_ids`, `bad_words` and `truncate_prompt_tokens` through the engine:
each reaches every kind of step (captured argmax shortcut, overlapped, plain and speculative
verification), touches only its own request, and bad settings are refused by name."""

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.requests import ContextLengthError
from hwattn.engine.sampler import SamplingInput, adjusted_logits, sample
from hwattn.engine.sampling_params import ParamError, bad_word_bans, bad_words_token_ids

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3], list(range(5, 40)), [7] * 5, [300, 301]]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 12), temperature=0, ignore_eos=True,
                          **kw)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


# allowed_token_ids

def test_allowed_token_ids_restrict_greedy_and_sampled_tokens(checkpoints):
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20)
    plain = tokens(llm.generate(PROMPTS, greedy()))
    allowed = sorted({t + 1 for row in plain for t in row} | set(range(600, 640)))
    masked = tokens(llm.generate(PROMPTS, greedy(allowed_token_ids=allowed)))
    assert all(set(row) <= set(allowed) for row in masked)
    assert masked != plain
    # Every id the unmasked run chose is disallowed now, and none of them appears.
    shifted = tokens(llm.generate(PROMPTS, greedy(allowed_token_ids=list(range(1000, 1100)))))
    assert all(set(row) <= set(range(1000, 1100)) for row in shifted)
    seeded = SamplingParams(max_tokens=12, temperature=1.5, seed=3, ignore_eos=True,
                            allowed_token_ids=[5, 9, 11])
    assert all(set(row) <= {5, 9, 11} for row in tokens(llm.generate(PROMPTS, seeded)))
    # One allowed token: every step is that token (the captured argmax path cannot take it).
    assert tokens(llm.generate(PROMPTS, greedy(allowed_token_ids=[42]))) == [[42] * 12] * 4
    assert llm.engine.block_manager.num_used_pages == 0


def test_allowed_token_ids_touch_only_their_own_request(checkpoints):
    llm = LLM(checkpoints("gqa-2"), page_size=8, memory_budget=1 << 20)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)
    masked = greedy(max_tokens=10, allowed_token_ids=list(range(0, 2048, 7)))
    alone = [tokens(llm.generate([PROMPTS[0]], greedy(max_tokens=10)))[0],
             tokens(llm.generate([PROMPTS[1]], sampled))[0],
             tokens(llm.generate([PROMPTS[2]], masked))[0]]
    crowd = tokens(llm.generate(PROMPTS[:3], [greedy(max_tokens=10), sampled, masked]))
    assert crowd == alone
    assert all(t % 7 == 0 for t in alone[2])


def test_logprobs_under_a_mask_are_the_models_own(checkpoints):
    """As vLLM's default (raw) log-probabilities: the sampled token's is its log-softmax over
    the whole vocabulary, and a disallowed token may be among the top ones reported."""
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20)
    plain = llm.generate([PROMPTS[0]], greedy(max_tokens=4, logprobs=3))[0].outputs[0]
    masked = llm.generate([PROMPTS[0]], greedy(max_tokens=1, logprobs=3,
                                               allowed_token_ids=[77]))[0].outputs[0]
    assert masked.token_ids == [77]
    first = masked.logprobs[0]
    assert first[77].logprob < 0 and first[77].rank >= 1
    top = {t for t, lp in plain.logprobs[0].items() if lp.rank <= 3}
    assert top <= set(first)  # the unmasked top tokens, reported though disallowed


def test_allowed_token_ids_are_refused_by_name():
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[1, -2])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=5)
    assert SamplingParams(allowed_token_ids=(3, 3, 1)).allowed_token_ids == [3, 1]


def test_allowed_token_ids_outside_the_vocabulary_are_refused(checkpoints):
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20)
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ParamError, match="allowed_token_ids") as err:
        llm.generate([PROMPTS[0]], greedy(allowed_token_ids=[1, vocab]))
    assert err.value.param == "allowed_token_ids"
    assert not llm.engine.has_unfinished()


# bad_words

class _Words:
    """A tokenizer whose words are one id each, and " w" another id than "w"."""

    def encode(self, text):
        ids = {"ab": [10, 11], " ab": [20, 11], "c": [12], " c": [21], "x y": [30, 31, 32],
               " x y": [30, 33]}
        return ids[text]


def test_bad_words_are_tokenized_as_vllm_does():
    words = bad_words_token_ids(["ab", "  c", "x y"], _Words())
    # " x y" has another length than "x y": left out, as vLLM leaves it.
    assert words == [[10, 11], [20, 11], [12], [21], [30, 31, 32]]
    assert bad_word_bans(words, []) == [12, 21]
    assert bad_word_bans(words, [5, 10]) == [11, 12, 21]
    assert bad_word_bans(words, [30, 31]) == [12, 21, 32]
    assert bad_word_bans(words, [31]) == [12, 21]


PRINTABLE = list(range(33, 127))  # byte tokens of printable ASCII: outputs that spell words


def printable(**kw) -> SamplingParams:
    return greedy(allowed_token_ids=PRINTABLE, **kw)


def test_a_bad_word_never_appears_where_greedy_wrote_it(checkpoints):
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20)
    prompt = list(b"the cat sat on the mat and the cat")
    single = llm.generate([prompt], printable(max_tokens=30))[0].outputs[0].token_ids
    at = next(i for i in range(1, len(single)) if single[i] not in single[:i])
    word = chr(single[at])
    banned = llm.generate([prompt], printable(max_tokens=30, bad_words=[word]))[0].outputs[0]
    assert ord(word) not in banned.token_ids
    assert banned.token_ids[:at] == single[:at] and banned.token_ids[at] != single[at]
    # A two-token word: its last token may still come, only never after its first.
    pair = [(a, b) for a, b in zip(single, single[1:]) if a != b][0]
    word = chr(pair[0]) + chr(pair[1])
    again = llm.generate([prompt], printable(max_tokens=30, bad_words=[word]))[0].outputs[0]
    assert again.token_ids != single
    assert all(tuple(again.token_ids[i:i + 2]) != pair for i in range(len(again.token_ids)))
    # The prompt does not count: a word made of the prompt's last token and a token the
    # output starts with is not banned there (vLLM matches within the output).
    edge = chr(prompt[-1]) + chr(single[0])
    kept = llm.generate([prompt], printable(max_tokens=30, bad_words=[edge]))[0].outputs[0]
    assert kept.token_ids[0] == single[0]
    assert llm.engine.block_manager.num_used_pages == 0


def test_bad_words_touch_only_their_own_request(checkpoints):
    llm = LLM(checkpoints("gqa-2"), page_size=8, memory_budget=1 << 20)
    plain = tokens(llm.generate(PROMPTS, [greedy(), greedy(), printable(), greedy()]))
    word = chr(plain[2][0])
    params = [greedy(), greedy(), printable(bad_words=[word]), greedy()]
    outs = tokens(llm.generate(PROMPTS, params))
    assert [outs[i] for i in (0, 1, 3)] == [plain[i] for i in (0, 1, 3)]
    assert ord(word) not in outs[2] and outs[2] != plain[2]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculation_verifies_bad_words_to_the_same_tokens(checkpoints, temperature):
    """n-gram drafts of a request with bad words are verified with each position's bans, so
    its tokens equal plain decoding's, greedy or seeded, and the other requests' too."""
    path = checkpoints("gta-4")
    plain_llm = LLM(path, page_size=4, num_pages=300, max_model_len=128)
    unbanned = tokens(plain_llm.generate(PROMPTS, printable(max_tokens=24)))
    # Two-byte words the greedy outputs of the odd prompts hold, and one byte of one.
    words = sorted({chr(a) + chr(b) for row in unbanned[1::2] for a, b in zip(row, row[1:])
                    if a != b})[:4] + [chr(unbanned[1][5])]
    params = [SamplingParams(max_tokens=24, temperature=temperature, seed=s, ignore_eos=True,
                             allowed_token_ids=PRINTABLE, bad_words=words if s % 2 else None)
              for s in range(len(PROMPTS))]
    plain = tokens(plain_llm.generate(PROMPTS, params))
    spec = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative="ngram",
               num_speculative_tokens=3)
    assert tokens(spec.generate(PROMPTS, params)) == plain
    assert spec.engine.stats()["draft_tokens"] > 0
    assert spec.engine.block_manager.num_used_pages == 0
    if temperature == 0:
        assert [plain[i] for i in (0, 2)] == [unbanned[i] for i in (0, 2)]
        for row in (plain[1], plain[3]):
            assert words[-1] not in map(chr, row)
            assert all(chr(a) + chr(b) not in words for a, b in zip(row, row[1:]))
        assert [plain[i] for i in (1, 3)] != [unbanned[i] for i in (1, 3)]


def test_a_draft_model_engine_decodes_bad_words_plainly(checkpoints):
    path = checkpoints("gta-4")
    params = [greedy(max_tokens=16, bad_words=["a"] if i == 1 else None,
                     allowed_token_ids=list(range(0, 2048, 3)) if i == 2 else None)
              for i in range(len(PROMPTS))]
    plain = tokens(LLM(path, page_size=4, num_pages=300, max_model_len=128)
                   .generate(PROMPTS, params))
    spec = LLM(path, page_size=4, num_pages=300, max_model_len=128,
               speculative=checkpoints("gta-4", draft_layers=1), num_speculative_tokens=3)
    assert tokens(spec.generate(PROMPTS, params)) == plain


def test_verified_positions_ban_after_the_drafts():
    """`SamplingInput.ahead` bans at offset j what the output and the first j drafts make
    bad: the verify rows of `repeat` carry them."""
    from hwattn.engine.sampler import verify_bans

    sp = SamplingParams(bad_words=["ab"])
    sp.bad_words_token_ids = [[1, 2], [3]]
    assert verify_bans(sp, [9, 1], [5, 1, 7]) == [(0, 2), (0, 3), (1, 3), (2, 2), (2, 3),
                                                   (3, 3)]
    si = SamplingInput.of([SamplingParams(temperature=0)], [0], [4])
    si.ahead = [[(1, 6), (2, 7)]]
    assert not si.argmax_only
    logits = torch.zeros(3, 10)
    logits[:, 6] = logits[:, 7] = 1.0
    out = sample(logits, si.tensors("cpu").repeat(3))
    assert out.tolist() == [6, 7, 6]


def test_bad_words_are_refused_by_name(checkpoints):
    for bad in ([""], ["  "], "word", [3]):
        with pytest.raises(ValueError, match="bad_words"):
            SamplingParams(bad_words=bad)
    assert SamplingParams(bad_words=[]).bad_words is None


# truncate_prompt_tokens

def test_truncation_equals_running_the_truncated_prompt(checkpoints):
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20, max_model_len=64)
    long = list(range(3, 100))  # longer than the context
    with pytest.raises(ContextLengthError):
        llm.generate([long], greedy())
    out = llm.generate([long], greedy(truncate_prompt_tokens=20))[0]
    assert out.prompt_token_ids == long[-20:]
    assert tokens([out]) == tokens(llm.generate([long[-20:]], greedy()))
    assert tokens([out]) != tokens(llm.generate([long[-30:]], greedy()))
    # -1: as much of the prompt as leaves room for a token.
    whole = llm.generate([long], greedy(max_tokens=1, truncate_prompt_tokens=-1))[0]
    assert whole.prompt_token_ids == long[-63:]
    # A text is tokenized in full and cut, however long.
    text = "x" * 500 + "the end"
    cut = llm.generate([text], greedy(truncate_prompt_tokens=5))[0]
    assert cut.prompt_token_ids == list(b" end"[-5:]) or cut.prompt_token_ids == \
        llm.engine.tokenizer.encode(text)[-5:]
    # A prompt shorter than k stays whole.
    short = llm.generate([[5, 6, 7]], greedy(truncate_prompt_tokens=10))[0]
    assert short.prompt_token_ids == [5, 6, 7]


def test_truncate_prompt_tokens_is_refused_by_name(checkpoints):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20, max_model_len=64)
    with pytest.raises(ParamError, match="truncate_prompt_tokens") as err:
        llm.generate([[1, 2]], greedy(truncate_prompt_tokens=65))
    assert err.value.param == "truncate_prompt_tokens"
    assert llm.generate([[1, 2]], greedy(truncate_prompt_tokens=64))[0].prompt_token_ids == [1, 2]


def test_none_of_them_leaves_the_argmax_shortcut():
    """Requests using none of the three still take the argmax-only path (no settings
    uploaded); each of the three leaves it."""
    from hwattn.engine.sequence import Sequence

    assert Sequence("a", [1], greedy(), 0).argmax_only
    assert not Sequence("a", [1], greedy(), 0).sampled_on_host
    assert Sequence("a", [1], greedy(truncate_prompt_tokens=3), 0).argmax_only
    assert not Sequence("a", [1], greedy(allowed_token_ids=[1]), 0).argmax_only
    assert not Sequence("a", [1], greedy(allowed_token_ids=[1]), 0).sampled_on_host
    words = greedy(bad_words=["x"])
    assert not Sequence("a", [1], words, 0).argmax_only
    assert Sequence("a", [1], words, 0).sampled_on_host
    si = SamplingInput.of([greedy(), greedy(min_p=0.1)], [0, 1], [3, 3])
    assert not si.allowed and not si.ahead
    st = si.tensors("cpu")
    assert st.allowed is None and st.ahead is None
    logits = torch.randn(2, 8)
    assert adjusted_logits(logits, st) is logits

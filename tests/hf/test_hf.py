"""transformers integration: lazy registration on `import hwattn`, loading checkpoints with
AutoModelForCausalLM, greedy generate() equal to hwattn's paged-cache decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hwattn
from hwattn.data.tokenizer import Tokenizer
from hwattn.models.checkpoint import load_checkpoint, save_checkpoint


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=300).stdout


@pytest.mark.slow
def test_import_hwattn_does_not_import_transformers_but_registers_on_its_import():
    out = _python("import sys, hwattn; print('transformers' in sys.modules); import transformers; "
                  "from transformers import AutoConfig; print(type(AutoConfig.for_model('hwattn')).__name__)")
    assert out.split() == ["False", "HwattnConfig"]
    out = _python("import transformers, hwattn; from transformers import AutoConfig; "
                  "print(type(AutoConfig.for_model('hwattn')).__name__)")
    assert out.strip() == "HwattnConfig"


def _random_checkpoint(tmp_path, variant: str, eos_token_id=None, **overrides):
    """A random-weight model of `variant` (biases random too), saved like a trained one."""
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.models.transformer import Transformer
    from tests.conftest import SMALL

    cfg = ModelConfig.from_preset("tiny", **parse_variant(variant), vocab_size=512,
                                  **{**SMALL, **overrides})
    model = Transformer(cfg)
    model.init_weights(seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "b_uk", "b_uv")):
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    name = variant + ("-bias" if cfg.attention_bias else "")
    return save_checkpoint(model, tmp_path / name, eos_token_id=eos_token_id), model.eval()


def _until_eos(row: torch.Tensor, start: int, eos: int | None) -> list[int]:
    """Tokens of `row` from `start` up to and including the first `eos`."""
    out = []
    for t in row[start:].tolist():
        out.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("variant, bias", [("gta-4", False), ("gla-2", False), ("mqa", False),
                                           ("mla", True), ("gla-2", True), ("gta-4", True)])
@pytest.mark.slow
def test_auto_model_generates_like_greedy_generate(trained, tmp_path, variant, bias):
    import transformers

    if variant == "gta-4" and not bias:
        ckpt = trained[0] / "checkpoint"
        ref = load_checkpoint(ckpt).eval()
    else:
        ckpt, ref = _random_checkpoint(tmp_path, variant, attention_bias=bias)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(hf).__name__ == "HwattnForCausalLM"
    assert hf.model.output.weight is hf.model.tok_embeddings.weight
    for k, v in ref.state_dict().items():
        assert torch.equal(hf.model.state_dict()[k], v), k
    eos = hf.generation_config.eos_token_id
    prompt = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    tokens, _ = hwattn.greedy_generate(ref, prompt, 24)
    for use_cache in (True, False):
        out = hf.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=use_cache,
                          attention_mask=torch.ones_like(prompt))
        for row in range(3):
            assert _until_eos(out[row], 9, eos) == _until_eos(tokens[row], 9, eos)
    # The forward pass is the same model: same logits, and labels give the usual LM loss.
    with torch.no_grad():
        res = hf(prompt, labels=prompt)
        logits = ref(prompt)
    assert torch.equal(res.logits, logits)
    expect = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), prompt[:, 1:].flatten())
    torch.testing.assert_close(res.loss, expect)


@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "gla-2"])
def test_generate_keeps_a_kv_cache(tmp_path, variant):
    """After the prompt, each generate() step feeds one token through the cache, and a
    forward split over a DynamicCache gives the whole sequence's logits."""
    import transformers

    ckpt, ref = _random_checkpoint(tmp_path, variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    widths = []
    decoder_forward = hf.model.forward
    hf.model.forward = lambda ids, *a, **k: (widths.append(ids.shape[1]), decoder_forward(ids, *a, **k))[1]
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    hf.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert widths == [7] + [1] * 5
    seq = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(4))
    cache = transformers.DynamicCache()
    with torch.no_grad():
        parts = [hf(seq[:, a:b], past_key_values=cache, use_cache=True).logits
                 for a, b in ((0, 5), (5, 6), (6, 9), (9, 12))]
        full = ref(seq)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "gla-2"])
def test_static_and_other_caches_are_refused_by_name(tmp_path, variant):
    """transformers' static cache preallocates one K and one V shape per layer, which GTA's and
    GLA's states do not have (and which GQA's unmasked attention would read past the prompt):
    generate(cache_implementation="static") says so instead of failing inside index_copy_."""
    import transformers

    ckpt, _ = _random_checkpoint(tmp_path, variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    # (transformers before 4.50 refuses it itself, reading _supports_static_cache = False.)
    with pytest.raises(ValueError, match="StaticCache cannot hold hwattn's cached states.*"
                                         "cache_implementation unset|does not support.*static"):
        hf.generate(prompt, max_new_tokens=3, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="past_key_values: a tuple"):
        hf(prompt, past_key_values=((torch.zeros(1), torch.zeros(1)),))
    assert hf.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "mla", "gla-2"])
def test_padded_batches_match_unpadded_rows(tmp_path, variant):
    """Left padding (generation) and right padding (scoring) give each row what it gets alone."""
    import transformers

    ckpt, ref = _random_checkpoint(tmp_path, variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (n,), generator=gen) for n in (5, 9, 1)]
    width = 9
    left, right = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    left_mask, right_mask = torch.zeros_like(left), torch.zeros_like(right)
    for i, p in enumerate(prompts):
        left[i, width - len(p):], left_mask[i, width - len(p):] = p, 1
        right[i, :len(p)], right_mask[i, :len(p)] = p, 1
    out = hf.generate(left, attention_mask=left_mask, max_new_tokens=10, do_sample=False,
                      pad_token_id=0)
    with torch.no_grad():
        left_logits = hf(left, attention_mask=left_mask).logits
        right_logits = hf(right, attention_mask=right_mask).logits
    for i, p in enumerate(prompts):
        alone, _ = hwattn.greedy_generate(ref, p[None], 10)
        assert out[i, width:].tolist() == alone[0, len(p):].tolist(), f"row {i}"
        with torch.no_grad():
            want = ref(p[None])[0]
        torch.testing.assert_close(left_logits[i, width - len(p):], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(right_logits[i, :len(p)], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        hf(left, attention_mask=left_mask[:, 1:])


def test_eos_in_config_stops_generation(tmp_path):
    import transformers

    _, model = _random_checkpoint(tmp_path / "probe", "gqa-2")
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    tokens, _ = hwattn.greedy_generate(model, prompt, 12)
    new = tokens[0, 6:].tolist()
    eos = new[3] if new[3] not in new[:3] else new[0]
    ckpt, _ = _random_checkpoint(tmp_path, "gqa-2", eos_token_id=eos)
    doc = json.loads((ckpt / "config.json").read_text())
    assert doc["eos_token_id"] == eos and doc["auto_map"]["AutoModelForCausalLM"]
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == eos
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    stop = new.index(eos)
    assert out[0, 6:].tolist() == new[:stop + 1]


def test_model_fields_match_model_config():
    """The standalone file restates ModelConfig's fields; they must not drift apart."""
    import dataclasses

    from hwattn.config import ModelConfig
    from hwattn.models.modeling_hwattn import MODEL_FIELDS

    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert fields == MODEL_FIELDS


def test_auto_tokenizer_reads_the_checkpoint_tokenizer(trained):
    import transformers

    ckpt = trained[0] / "checkpoint"
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ours = Tokenizer.load(ckpt)
    text = "Fellow-Citizens of the Senate, it's 1790."
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_registration_survives_find_spec_probes():
    """Libraries probe `importlib.util.find_spec("transformers")` before importing it."""
    out = _python("import importlib.util, hwattn; importlib.util.find_spec('transformers'); "
                  "importlib.util.find_spec('transformers'); import transformers; "
                  "from transformers import AutoConfig; print(type(AutoConfig.for_model('hwattn')).__name__)")
    assert out.strip() == "HwattnConfig"


# Runs with hwattn unimportable (an import blocker, the repository off sys.path): the
# checkpoint's own modeling_hwattn.py and tokenizer files must be enough.
_WITHOUT_HWATTN = """
import sys
class NoHwattn:
    def find_spec(self, name, path=None, target=None):
        if name == "hwattn" or name.startswith("hwattn."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoHwattn())
sys.path = [p for p in sys.path if p not in ("", sys.argv[2])]
import json, torch, transformers
ckpt = sys.argv[1]
tok = transformers.AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
tok.padding_side = "left"
batch = tok(["It was the best of times,", "Fellow-Citizens of the Senate and"],
            return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=12, do_sample=False)
assert not [m for m in sys.modules if m == "hwattn" or m.startswith("hwattn.")]
print(json.dumps({"module": type(model).__module__, "ids": batch["input_ids"].tolist(),
                  "mask": batch["attention_mask"].tolist(), "out": out.tolist()}))
"""


@pytest.mark.slow
def test_trust_remote_code_loads_without_hwattn(trained, tmp_path):
    import transformers

    ckpt = trained[0] / "checkpoint"
    assert (ckpt / "modeling_hwattn.py").is_file()
    # A checkpoint saved by transformers itself keeps the code and the auto_map too.
    resaved = tmp_path / "resaved"
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    hf.save_pretrained(resaved)
    transformers.AutoTokenizer.from_pretrained(ckpt).save_pretrained(resaved)
    assert json.loads((resaved / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    ref = load_checkpoint(ckpt).eval()
    repo = str(Path(hwattn.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    eos = Tokenizer.load(ckpt).eot_id
    for folder in (ckpt, resaved):
        res = subprocess.run([sys.executable, "-c", _WITHOUT_HWATTN, str(folder), repo],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        doc = json.loads(res.stdout.strip().splitlines()[-1])
        assert doc["module"].startswith("transformers_modules.")
        for ids, mask, out in zip(doc["ids"], doc["mask"], doc["out"]):
            prompt = torch.tensor([[t for t, m in zip(ids, mask) if m]])
            tokens, _ = hwattn.greedy_generate(ref, prompt, 12)
            width = len(ids)
            assert _until_eos(torch.tensor(out), width, eos) == _until_eos(tokens[0], prompt.shape[1], eos)

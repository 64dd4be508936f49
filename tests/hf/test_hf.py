"""transformers integration: lazy registration on `import hwattn`, loading checkpoints with
AutoModelForCausalLM, greedy generate() equal to hwattn's paged-cache decoding."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hwattn
from hwattn.data.tokenizer import Tokenizer
from hwattn.models.checkpoint import load_checkpoint, save_checkpoint


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def test_import_hwattn_does_not_import_transformers_but_registers_on_its_import():
    out = _python("import sys, hwattn; print('transformers' in sys.modules); import transformers; "
                  "from transformers import AutoConfig; print(type(AutoConfig.for_model('hwattn')).__name__)")
    assert out.split() == ["False", "HwattnConfig"]
    out = _python("import transformers, hwattn; from transformers import AutoConfig; "
                  "print(type(AutoConfig.for_model('hwattn')).__name__)")
    assert out.strip() == "HwattnConfig"


@pytest.mark.parametrize("variant", ["gta-4", "gla-2", "mqa"])
def test_auto_model_generates_like_greedy_generate(trained, tmp_path, variant):
    import transformers

    if variant == "gta-4":
        ckpt = trained[0] / "checkpoint"
    else:  # a random-weight model of another family, saved in the same layout
        from hwattn.config import ModelConfig, parse_variant
        from hwattn.models.transformer import Transformer
        from tests.conftest import SMALL

        model = Transformer(ModelConfig.from_preset("tiny", **parse_variant(variant), vocab_size=512, **SMALL))
        model.init_weights(seed=5)
        ckpt = save_checkpoint(model, tmp_path / variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(hf).__name__ == "HwattnForCausalLM"
    assert hf.model.output.weight is hf.model.tok_embeddings.weight
    ref = load_checkpoint(ckpt).eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(hf.model.state_dict()[k], v), k
    prompt = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    out = hf.generate(prompt, max_new_tokens=24, do_sample=False,
                      attention_mask=torch.ones_like(prompt), pad_token_id=0)
    tokens, _ = hwattn.greedy_generate(ref, prompt, 24)
    assert torch.equal(out, tokens)
    # The forward pass is the same model: same logits, and labels give the usual LM loss.
    with torch.no_grad():
        res = hf(prompt, labels=prompt)
        logits = ref(prompt)
    assert torch.equal(res.logits, logits)
    expect = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), prompt[:, 1:].flatten())
    torch.testing.assert_close(res.loss, expect)
    with pytest.raises(ValueError, match="padding"):
        hf(prompt, attention_mask=torch.zeros_like(prompt))


def test_auto_tokenizer_reads_the_checkpoint_tokenizer(trained):
    import transformers

    ckpt = trained[0] / "checkpoint"
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ours = Tokenizer.load(ckpt)
    text = "Fellow-Citizens of the Senate, it's 1790."
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>"


def test_registration_survives_find_spec_probes():
    """Libraries probe `importlib.util.find_spec("transformers")` before importing it."""
    out = _python("import importlib.util, hwattn; importlib.util.find_spec('transformers'); "
                  "importlib.util.find_spec('transformers'); import transformers; "
                  "from transformers import AutoConfig; print(type(AutoConfig.for_model('hwattn')).__name__)")
    assert out.strip() == "HwattnConfig"

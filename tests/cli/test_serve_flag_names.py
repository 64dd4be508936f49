"""`hwattn serve` names the engine's fields in its errors by the options that set them, and
leaves the same words alone where a message uses them in prose."""

import pytest

from hwattn.cli.serve import ENGINE_FLAGS, flag_names


@pytest.mark.parametrize("text, want", [
    # Fields, as the engine's messages name them.
    ("speculative must be None, 'ngram' or a draft checkpoint directory, got ''",
     "--speculative must be None, 'ngram' or a draft checkpoint directory, got ''"),
    ("num_speculative_tokens must be >= 1 with speculative='ngram', got 0",
     "--num-speculative-tokens must be >= 1 with --speculative='ngram', got 0"),
    ("speculative_disable_batch_size=4 needs speculative ('ngram' or a draft checkpoint "
     "directory)", "--speculative-disable-batch-size=4 needs --speculative ('ngram' or a draft "
                   "checkpoint directory)"),
    ("a draft model cannot be combined with tensor_parallel_size > 1; use speculative='ngram'",
     "a draft model cannot be combined with --tp > 1; use --speculative='ngram'"),
    # The same word in prose: observed written as the option ("--speculative decoding").
    ("speculative decoding needs a drafter; the draft model's context is shorter than "
     "max_model_len 512",
     "speculative decoding needs a drafter; the draft model's context is shorter than "
     "--max-model-len 512"),
    ("no speculative (draft) tokens fit: Speculative steps are off",
     "no speculative (draft) tokens fit: Speculative steps are off"),
], ids=["must", "assigned", "values", "identifier", "prose", "prose-parenthesis"])
def test_flag_names_rewrites_fields_and_leaves_prose(text, want):
    assert flag_names(text) == want


def test_every_field_without_an_underscore_is_left_in_prose():
    """Each plain-word field (one that is also an English word) stays as it is in a sentence
    and becomes its option where the message gives it a value."""
    words = [name for name in ENGINE_FLAGS if "_" not in name]
    assert words  # speculative, today
    for name in words:
        assert flag_names(f"the {name} path is slow") == f"the {name} path is slow"
        assert flag_names(f"{name}=3 is refused") == f"{ENGINE_FLAGS[name]}=3 is refused"

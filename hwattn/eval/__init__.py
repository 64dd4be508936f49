"""Evaluation: perplexity and bits per byte, cloze and multiple choice, the recall probe, the lm-eval adapter and the study report."""

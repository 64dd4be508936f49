"""`hwattn convert`: a checkpoint of the paper's released GTA / GLA code -> an hwattn checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    from hwattn.cli import add_cpu_threads

    p = sub.add_parser("convert", help="convert a checkpoint of the paper's released GTA/GLA "
                                       "code into an hwattn checkpoint",
                       description="Reads a directory written by the paper's Llama-style modeling "
                                   "files (config.json + *.safetensors or pytorch_model*.bin), maps "
                                   "its parameter names and shapes onto hwattn's (biased "
                                   "projections become attention_bias=True) and writes an hwattn "
                                   "checkpoint folder, tokenizer files included.")
    p.add_argument("source", help="directory of the paper-format checkpoint")
    p.add_argument("out", help="output checkpoint directory")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import shutil
    from pathlib import Path

    from hwattn.cli import check_output_dir
    from hwattn.models.checkpoint import save_checkpoint
    from hwattn.models.convert import load_paper_checkpoint

    src, out = Path(args.source), Path(args.out)
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise ValueError(f"the output {args.out} is the source folder: converting there would "
                         f"overwrite the checkpoint being read; give another folder")
    check_output_dir(args.out, "output")
    try:
        theirs = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        theirs = None  # load_paper_checkpoint says what is missing or wrong
    if isinstance(theirs, dict) and theirs.get("model_type") == "hwattn":
        raise ValueError(f"{src} is already an hwattn checkpoint; it needs no conversion")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    stale = [name for name in tokenizer_files
             if (out / name).exists() and not (src / name).is_file()]
    if stale:  # they would be left beside the converted weights as if they were its own
        raise ValueError(f"the output {args.out} holds {', '.join(stale)}, which the source "
                         f"{src} has not: the converted model would be read with another "
                         f"model's tokenizer; give an empty folder or remove them")
    model = load_paper_checkpoint(src)  # ValueError naming what is missing or wrong
    their = json.loads((src / "config.json").read_text())
    eos = their.get("eos_token_id")
    eos = (eos[0] if eos else None) if isinstance(eos, list) else eos
    vocab = model.config.vocab_size
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)
                            or not 0 <= eos < vocab):
        raise ValueError(f"{src / 'config.json'}: eos_token_id {eos!r} is not a token id in "
                         f"[0, vocab_size = {vocab}); it would be written as the end-of-text "
                         f"id that generate() stops at")
    save_checkpoint(model, out, eos_token_id=eos)
    copied = []
    for name in tokenizer_files:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    cfg = model.config
    print(f"{src} -> {out}: {cfg.label}, {cfg.n_layers} layers, dim {cfg.dim}, "
          f"{model.num_params():,} parameters, attention_bias={cfg.attention_bias}"
          + (f"; copied {', '.join(copied)}" if copied else ""))
    return 0

"""How should a built dataset travel to a machine without network: as compressed text to be
tokenized there, or as compressed token shards? Measured on one core, per domain, on the
held-out documents of a build (the same documents in both forms).

    python benchmarks/carry_formats.py --data data/study [--preset 9]

For each domain: UTF-8 bytes and tokens; xz size of the text and of the uint16/uint32
token ids (LZMA2, the pack's settings); tokenization speed (tokens/s on one core, Rust
tokenizers with one thread); decompression speed of the token xz (tokens/s on one core).
Prints a table and one line of JSON.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # one core: before tokenizers is imported
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import lzma  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/study",
                   help="a folder written by `hwattn data build` (default %(default)s)")
    p.add_argument("--preset", type=int, default=9, help="xz preset (the pack uses 9)")
    args = p.parse_args(argv)

    import numpy as np

    from hwattn.data.loader import TokenDataset

    data = TokenDataset(args.data)
    tok = data.tokenizer
    itemsize = np.dtype(data.manifest["dtype"]).itemsize
    bits = {2: 1, 4: 2}[itemsize]
    docs = data.val_documents()
    rows = []
    for domain in data.domains:
        texts = [d["text"] for d in docs if d["domain"] == domain]
        raw_text = "".join(t + "\n" for t in texts).encode()
        t0 = time.perf_counter()
        ids = tok.encode_batch(texts)
        encode_s = time.perf_counter() - t0
        n_tok = sum(len(x) for x in ids)
        shard = np.asarray(data.val[domain]).tobytes()
        text_xz = lzma.compress(raw_text, preset=args.preset)
        tok_xz = lzma.compress(shard, format=lzma.FORMAT_XZ, filters=[
            {"id": lzma.FILTER_LZMA2, "preset": args.preset, "lp": bits, "pb": bits}])
        t0 = time.perf_counter()
        lzma.decompress(tok_xz)
        dec_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lzma.decompress(text_xz)
        dec_text_s = time.perf_counter() - t0
        rows.append({"domain": domain, "bytes": len(raw_text), "tokens": n_tok,
                     "text_xz": len(text_xz), "tokens_xz": len(tok_xz),
                     "text_xz_bytes_per_token": len(text_xz) / n_tok,
                     "tokens_xz_bytes_per_token": len(tok_xz) / n_tok,
                     "tokenize_tokens_per_s_per_core": n_tok / encode_s,
                     "text_decompress_mb_per_s_per_core": len(raw_text) / dec_text_s / 1e6,
                     "token_decompress_tokens_per_s_per_core": (len(shard) / itemsize) / dec_s})
    print("| domain | text MB | tokens | text.xz B/token | tokens.xz B/token | tokenize tok/s/core "
          "| text unxz MB/s/core | tokens unxz tok/s/core |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['domain']} | {r['bytes'] / 1e6:.1f} | {r['tokens']:,} | "
              f"{r['text_xz_bytes_per_token']:.3f} | {r['tokens_xz_bytes_per_token']:.3f} | "
              f"{r['tokenize_tokens_per_s_per_core']:,.0f} | "
              f"{r['text_decompress_mb_per_s_per_core']:.0f} | "
              f"{r['token_decompress_tokens_per_s_per_core']:,.0f} |")
    print(json.dumps({"data": args.data, "build_key": data.manifest["build_key"], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cases `hwattn bench decode` times: the standard sweep, the product of the command
line's lists, and uneven batches (`--mixed`). A case is a dict: variant, heads, tp, batch,
context, query_len, page; an uneven one adds `lengths` (one per sequence) and its `mixed` spec,
with context the longest length."""

from __future__ import annotations


def standard_suite() -> list[dict]:
    """The standard sweep, (variant, h_q, tp, B, L, L_q, page): the latent variants at the
    paper's h_q = 128, one rank's shapes of the KV-head variants at TP 1 / 4 / 8, long contexts
    at B = 1 and 4 (split-KV), and page sizes 1 / 16 / 256."""
    cases = []
    for variant in ("gla-2", "mla"):
        for l_q in (1, 2):
            for length in (4096, 8192, 16384, 32768):
                cases.append(dict(variant=variant, heads=128, tp=1, batch=128, context=length,
                                  query_len=l_q, page=64))
    for variant in ("gqa-4", "gta-4", "mqa"):
        for tp in (1, 4, 8):
            for length in (8192, 16384):
                cases.append(dict(variant=variant, heads=32, tp=tp, batch=128, context=length,
                                  query_len=1, page=64))
    for variant, heads in (("gqa-4", 32), ("gta-4", 32), ("gla-2", 128)):
        for batch in (1, 4):
            for length in (32768, 131072):
                cases.append(dict(variant=variant, heads=heads, tp=1, batch=batch, context=length,
                                  query_len=1, page=64))
    for variant, heads in (("gla-2", 128), ("gqa-4", 32)):
        for page in (1, 16, 256):
            cases.append(dict(variant=variant, heads=heads, tp=1, batch=128, context=8192,
                              query_len=1, page=page))
    return cases


def product_suite(variants: list[str], heads: int | None, tp: list[int], batch: list[int],
                  context: list[int], query_len: list[int], page_size: list[int],
                  mixed: list[tuple[str, list[int]]] = ()) -> list[dict]:
    """Every combination of the lists; `heads` None takes each variant's `bench_heads`.

    The batch shapes of each (variant, tp) are every (B, L) of `batch` x `context` (uniform:
    B sequences of L tokens), then each uneven batch of `mixed` ((spec, lengths) pairs from
    `parse_mixed`): a case with batch = len(lengths), context = the longest length, the
    `lengths` (B,) and the `mixed` spec it came from. ValueError naming --mixed and
    --query-len if an uneven batch has a sequence shorter than a query length."""
    from hwattn.variants import get_variant, parse_variant

    shapes = [dict(batch=b, context=length) for b in batch for length in context]
    shapes += [dict(batch=len(lengths), context=max(lengths), lengths=list(lengths), mixed=spec)
               for spec, lengths in mixed]
    for spec, lengths in mixed:
        if min(lengths) < max(query_len):
            raise ValueError(f"--mixed {spec} has a sequence of {min(lengths)} token(s), shorter "
                             f"than --query-len {max(query_len)} (every sequence holds its "
                             f"queries)")
    cases = []
    for variant in variants:
        h = heads or get_variant(parse_variant(variant)["attention"]).bench_heads
        for t in tp:
            for shape in shapes:
                for l_q in query_len:
                    for page in page_size:
                        cases.append(dict(variant=variant, heads=h, tp=t, **shape,
                                          query_len=l_q, page=page))
    return cases


def parse_mixed(text: str) -> list[tuple[str, list[int]]]:
    """Uneven batches from `--mixed`: ';'-separated specs, each 'LENxCOUNT' terms joined by
    '+' ('131072x1+1024x63': one sequence of 131072 tokens, then 63 of 1024).

    Returns one (spec, lengths) per spec, in order: the spec written back canonically
    ('LENxCOUNT+...', integers without padding) and lengths, a list of B = sum of the counts
    ints in the order the terms give them. ValueError naming --mixed and the spec for a term
    that is not two integers joined by 'x', a length or count below 1, a spec given twice, or
    no spec at all."""
    out = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        lengths, terms = [], []
        for term in (t.strip() for t in spec.split("+")):
            try:
                length, count = (int(v) for v in term.lower().split("x"))
            except ValueError:
                raise ValueError(f"--mixed {spec!r}: each term must be LENGTHxCOUNT (e.g. "
                                 f"131072x1+1024x63), got {term!r}") from None
            if length < 1 or count < 1:
                raise ValueError(f"--mixed {spec!r}: lengths and counts must be positive, got "
                                 f"{term!r}")
            terms.append(f"{length}x{count}")
            lengths += [length] * count
        canonical = "+".join(terms)
        if canonical in (s for s, _ in out):
            raise ValueError(f"--mixed names {canonical} more than once")
        out.append((canonical, lengths))
    if not out:
        raise ValueError(f"--mixed {text!r} names no batch; e.g. 131072x1+1024x63")
    return out


def case_lengths(case: dict) -> list[int]:
    """The case's tokens per sequence, (B,): its `lengths` if uneven, else B times `context`."""
    return list(case["lengths"]) if "lengths" in case else [case["context"]] * case["batch"]


def case_label(case: dict) -> str:
    """The case's lengths as the table prints them: L, or the uneven batch's spec."""
    return case.get("mixed") or str(case["context"])

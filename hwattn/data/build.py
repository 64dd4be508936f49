"""`hwattn data build`: documents -> deduplicated train / validation split -> token shards.

Output folder:

    manifest.json          sources, licences, archive and shard sha256, token counts, options
    tokenizer.json         the tokenizer the shards were written with
    train.bin              all training documents in source order, each preceded by <|endoftext|>
    val_<domain>.bin       held-out documents of one domain, same layout
    val_docs.jsonl         the held-out documents as text (cloze and multiple-choice tasks);
                           plain JSON lines, so that the same documents are the same bytes
                           (`hwattn data pack` compresses it for transport)

Shards are flat numpy arrays (uint16 when the vocabulary fits, else uint32) read back with
`numpy.memmap`. Every file is written under a staging folder and renamed into place, the
manifest last, so a failed build never leaves a half-written shard; a build whose inputs and
options match the existing manifest (and whose shards still hash the same) does nothing.
The same inputs and options give byte-identical files. A killed build leaves its trained
tokenizer and encoded chunks in `.work-<key>/` and resumes from them; the folders of dead
builds are removed by the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hwattn.data.sources import sha256_file
from hwattn.data.tokenizer import Tokenizer

FORMAT = "hwattn-data-1"
# Bumped whenever extraction or cleaning changes what a build contains (part of the build key).
EXTRACT_VERSION = 3
MANIFEST = "manifest.json"
VAL_DOCS = "val_docs.jsonl"


@dataclass
class BuildOptions:
    """What decides the content of a build (hashed into the manifest's `build_key`).

    val_fraction: share of each domain's documents held out (by document id hash).
    max_train_tokens_per_domain / max_val_tokens_per_domain: caps (0 = none), applied to
        documents in a seeded random order.
    min_paragraph_chars: paragraphs at least this long are deduplicated across the corpus.
    tokenizer_sample_chars: a trained (bpe:N) tokenizer learns from training documents
        drawn in a seeded random order up to this many characters (0 = all of them).
    """

    val_fraction: float = 0.03
    max_train_tokens_per_domain: int = 0
    max_val_tokens_per_domain: int = 0
    min_paragraph_chars: int = 64
    tokenizer_sample_chars: int = 48_000_000
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("max_train_tokens_per_domain", "max_val_tokens_per_domain",
                     "tokenizer_sample_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DedupeStats:
    documents_in: int = 0
    duplicate_documents: int = 0
    duplicate_paragraphs: int = 0
    mostly_duplicate_documents: int = 0
    empty_documents: int = 0
    by_source: dict = field(default_factory=lambda: defaultdict(Counter))


def _key(text: str) -> str:
    return hashlib.sha1(re.sub(r"[^0-9a-z]+", "", text.lower()).encode()).hexdigest()


def deduplicate(docs: Iterable[dict], min_paragraph_chars: int = 64,
                stats: DedupeStats | None = None) -> list[dict]:
    """Drop exact duplicate documents (ignoring case, spacing and punctuation), then every
    paragraph of at least `min_paragraph_chars` already seen earlier in the stream; a
    document that loses more than half of its text that way is dropped whole."""
    stats = stats if stats is not None else DedupeStats()
    seen_docs, seen_paras, out = set(), set(), []
    for doc in docs:
        stats.documents_in += 1
        src = stats.by_source[doc["source"]]
        k = _key(doc["text"])
        if k in seen_docs:
            stats.duplicate_documents += 1
            src["duplicate_documents"] += 1
            continue
        seen_docs.add(k)
        kept, dropped = [], 0
        for para in doc["text"].split("\n\n"):
            if len(para) >= min_paragraph_chars:
                pk = _key(para)
                if pk in seen_paras:
                    dropped += len(para)
                    stats.duplicate_paragraphs += 1
                    continue
                seen_paras.add(pk)
            kept.append(para)
        text = "\n\n".join(kept).strip()
        if not text:
            stats.empty_documents += 1
            continue
        if dropped > len(doc["text"]) / 2:
            stats.mostly_duplicate_documents += 1
            src["mostly_duplicate_documents"] += 1
            continue
        out.append({**doc, "text": text})
    return out


def is_validation(doc_id: str, fraction: float) -> bool:
    """Deterministic held-out membership from the document id."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


def split_documents(docs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Train / validation by document id, per domain; every domain with at least two
    documents gets at least one in each split."""
    by_domain = defaultdict(list)
    for d in docs:
        by_domain[d["domain"]].append(d)
    train, val = [], []
    for domain, items in sorted(by_domain.items()):
        v = [d for d in items if is_validation(d["id"], fraction)]
        t = [d for d in items if not is_validation(d["id"], fraction)]
        if len(items) >= 2 and not v:
            v, t = t[-1:], t[:-1]
        if len(items) >= 2 and not t:
            t, v = v[:1], v[1:]
        train += t
        val += v
    return train, val


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_folders(out_dir: Path, keep: str | None = None, log=print) -> list[str]:
    """Delete the `.staging-<pid>` and `.work-<key>` folders in `out_dir` left by builds that
    died (their process is gone), except `keep`. Returns the names removed."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for p in sorted(out_dir.iterdir()):
        if not p.is_dir() or p.name == keep:
            continue
        if p.name.startswith(".staging-"):
            pid = p.name.removeprefix(".staging-")
            if not pid.isdigit():
                continue  # not a folder this code makes
        elif p.name.startswith(".work-"):
            owner = p / "pid"
            pid = owner.read_text().strip() if owner.is_file() else ""
        else:
            continue
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # a build running now
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        log(f"{out_dir}: removed {len(removed)} folder(s) left by interrupted builds: "
            + ", ".join(removed))
    return removed


def sample_texts(docs: list[dict], max_chars: int, seed: int) -> list[str]:
    """Texts of `docs` in a seeded random order until `max_chars` characters (0 = all, in
    document order): what a BPE tokenizer is trained on."""
    if not max_chars or sum(len(d["text"]) for d in docs) <= max_chars:
        return [d["text"] for d in docs]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        out.append(docs[i]["text"])
        total += len(docs[i]["text"])
    return out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class _Work:
    """The resumable part of a build: `<out>/.work-<build key>/` keeps the trained tokenizer
    and every finished chunk of encoded documents, so a killed build resumes where it was."""

    CHUNK_DOCS = 2048

    def __init__(self, out_dir: Path, key: str):
        self.path = out_dir / f".work-{key[:16]}"

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "pid").write_text(f"{os.getpid()}\n")

    def tokenizer(self, train_fn) -> Tokenizer:
        folder = self.path / "tokenizer"
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.load(folder)
        tok = train_fn()
        self.start()
        tmp = self.path / f".tokenizer-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return tok

    def encode(self, tokenizer: Tokenizer, docs: list[dict], split: str, dtype,
               progress: bool) -> list[np.ndarray]:
        """Token ids (one array per document) of `docs`, chunk by chunk, reusing chunks a
        previous attempt finished."""
        from hwattn.data.progress import progress_bar

        self.start()
        out: list[np.ndarray] = []
        bar = progress_bar(total=sum(len(d["text"]) for d in docs), desc=f"tokenize {split}",
                           unit="char", unit_scale=True, disable=not progress)
        for k, first in enumerate(range(0, len(docs), self.CHUNK_DOCS)):
            chunk = docs[first:first + self.CHUNK_DOCS]
            file = self.path / f"{split}-{k:05d}.npz"
            if file.is_file():
                saved = np.load(file)
                ids, offsets = saved["ids"], saved["offsets"]
            else:
                lists = tokenizer.encode_batch([d["text"] for d in chunk])
                offsets = np.cumsum([0] + [len(x) for x in lists], dtype=np.int64)
                ids = np.concatenate([np.asarray(x, dtype=dtype) for x in lists] +
                                     [np.empty(0, dtype=dtype)])

                def save(tmp, ids=ids, offsets=offsets):
                    with open(tmp, "wb") as f:
                        np.savez(f, ids=ids, offsets=offsets)
                _atomic_write(file, save)
            out += [ids[offsets[i]:offsets[i + 1]] for i in range(len(chunk))]
            bar.update(sum(len(d["text"]) for d in chunk))
        bar.close()
        return out

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _cap(docs: list[dict], ids: list[np.ndarray], cap: int, seed: int) -> list[int]:
    """Indices of the documents kept under a cap of `cap` tokens per domain (0 = all):
    documents are taken in a seeded random order; the result is in document order."""
    if not cap:
        return list(range(len(docs)))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    used = Counter()
    keep = []
    for i in order:
        dom = docs[i]["domain"]
        if used[dom] >= cap:
            continue
        used[dom] += len(ids[i]) + 1
        keep.append(i)
    return sorted(keep)


def _write_shard(path: Path, ids: list[np.ndarray], order: list[int], eot: int, dtype) -> dict:
    n = sum(len(ids[i]) + 1 for i in order)
    arr = np.empty(n, dtype=dtype)
    pos = 0
    for i in order:
        arr[pos] = eot
        arr[pos + 1:pos + 1 + len(ids[i])] = ids[i]
        pos += 1 + len(ids[i])
    with open(path, "wb") as f:
        f.write(arr.tobytes())
    return {"file": path.name, "tokens": int(n), "documents": len(order),
            "sha256": sha256_file(path)}


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """One JSON object a line, UTF-8, keys in the order given."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def up_to_date(out_dir: str | Path, build_key: str) -> bool:
    """True when `out_dir` holds a build of `build_key` whose files still hash as recorded."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        return False
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if man.get("build_key") != build_key:
        return False
    for entry in man.get("files", {}).values():
        f = out_dir / entry["file"]
        if not f.is_file() or sha256_file(f) != entry["sha256"]:
            return False
    return True


def build_key(inputs: dict, options: BuildOptions, tokenizer_spec: dict) -> str:
    doc = {"format": FORMAT, "extract": EXTRACT_VERSION, "inputs": inputs, "options": asdict(options),
           "tokenizer": tokenizer_spec}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def write_build(out_dir: str | Path, docs: list[dict], tokenizer_factory, options: BuildOptions,
                key: str, sources: list[dict], progress: bool = True,
                log=print) -> dict:
    """Deduplicate, split, tokenize and write shards + manifest for `docs`.

    `tokenizer_factory(train_texts) -> Tokenizer` builds the tokenizer (it may train on the
    training split, sampled to `options.tokenizer_sample_chars`). The trained tokenizer and
    the encoded documents are kept in `<out>/.work-<key>/` until the build finishes, so an
    interrupted build resumes from them. The training shard holds the documents in source
    order (the loader samples windows at random, and neighbouring files of one project
    compress far better in a pack). Returns the manifest; raises ValueError when nothing
    is left to train on.
    """
    out_dir = Path(out_dir)
    stats = DedupeStats()
    docs = deduplicate(docs, options.min_paragraph_chars, stats)
    if not docs:
        raise ValueError(f"no documents with text to build from ({stats.documents_in} read, "
                         f"{stats.documents_in - stats.empty_documents} non-empty before "
                         "deduplication)")
    train, val = split_documents(docs, options.val_fraction)
    if not train:
        raise ValueError(f"all {len(docs)} documents went to validation; a build needs at "
                         "least two documents")
    log(f"{stats.documents_in} documents in, {len(docs)} after deduplication "
        f"({stats.duplicate_documents} duplicate, {stats.mostly_duplicate_documents} mostly "
        f"duplicate, {stats.duplicate_paragraphs} repeated paragraphs removed); "
        f"{len(train)} train / {len(val)} validation")
    work = _Work(out_dir, key)
    remove_stale_folders(out_dir, keep=work.path.name, log=log)
    texts = sample_texts(train, options.tokenizer_sample_chars, options.seed)
    tokenizer = work.tokenizer(lambda: tokenizer_factory(texts))
    del texts
    dtype = _token_dtype(tokenizer.vocab_size)
    train_ids = work.encode(tokenizer, train, "train", dtype, progress)
    val_ids = work.encode(tokenizer, val, "val", dtype, progress)

    staging = out_dir / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        files = {}
        tokenizer.save(staging)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            files[name.split(".")[0]] = {"file": name, "sha256": sha256_file(staging / name)}

        keep = _cap(train, train_ids, options.max_train_tokens_per_domain, options.seed)
        splits = {"train": _write_shard(staging / "train.bin", train_ids, keep, tokenizer.eot_id,
                                        dtype)}
        if splits["train"]["tokens"] <= splits["train"]["documents"]:
            raise ValueError("the training split holds no tokens")
        by_dom, by_src = Counter(), Counter()
        for i in keep:
            by_dom[train[i]["domain"]] += len(train_ids[i]) + 1
            by_src[train[i]["source"]] += len(train_ids[i]) + 1
        splits["train"]["tokens_by_domain"] = dict(sorted(by_dom.items()))
        splits["train"]["tokens_by_source"] = dict(sorted(by_src.items()))
        splits["train"]["bytes"] = sum(len(train[i]["text"].encode()) for i in keep)
        files["train"] = {k: splits["train"][k] for k in ("file", "sha256")}

        val_keep = _cap(val, val_ids, options.max_val_tokens_per_domain, options.seed + 1)
        splits["val"] = {}
        kept_val = []
        for domain in sorted({val[i]["domain"] for i in val_keep}):
            idx = [i for i in val_keep if val[i]["domain"] == domain]
            idx.sort(key=lambda i: val[i]["id"])
            entry = _write_shard(staging / f"val_{domain}.bin", val_ids, idx, tokenizer.eot_id, dtype)
            entry["bytes"] = sum(len(val[i]["text"].encode()) for i in idx)
            splits["val"][domain] = entry
            files[f"val_{domain}"] = {k: entry[k] for k in ("file", "sha256")}
            kept_val += [val[i] for i in idx]
        write_jsonl(staging / VAL_DOCS, kept_val)
        files["val_docs"] = {"file": VAL_DOCS, "sha256": sha256_file(staging / VAL_DOCS)}

        src_counts = defaultdict(Counter)
        for d in docs:
            src_counts[d["source"]]["documents"] += 1
            src_counts[d["source"]]["chars"] += len(d["text"])
        for s in sources:
            s.update(documents_after_dedupe=src_counts[s["name"]]["documents"],
                     chars_after_dedupe=src_counts[s["name"]]["chars"],
                     **{k: v for k, v in sorted(stats.by_source[s["name"]].items())})
        manifest = {
            "format": FORMAT, "build_key": key, "options": asdict(options),
            "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                          "eot_id": tokenizer.eot_id, "sha256": tokenizer.sha256(),
                          "file": "tokenizer.json"},
            "dtype": np.dtype(dtype).name, "sources": sources,
            "dedupe": {k: getattr(stats, k) for k in ("documents_in", "duplicate_documents",
                                                      "duplicate_paragraphs",
                                                      "mostly_duplicate_documents",
                                                      "empty_documents")},
            "splits": splits, "files": files,
        }
        (out_dir / MANIFEST).unlink(missing_ok=True)  # the old build is gone from here on
        for entry in files.values():
            os.replace(staging / entry["file"], out_dir / entry["file"])
        _atomic_write(out_dir / MANIFEST, lambda tmp: tmp.write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    work.remove()
    return manifest

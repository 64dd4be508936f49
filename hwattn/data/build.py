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
PACK_FILE = "pack.json"  # what marks a folder written by `hwattn data pack` (hwattn/data/pack.py)


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
    # Known limitation, kept because the key decides what a build holds: only ASCII letters
    # and digits count, so texts that differ only in other scripts' letters count as
    # duplicates (tests/data/test_review.py, the xfail).
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


DOMAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_domains(docs: Iterable[dict]) -> None:
    """ValueError unless every document's domain can name its validation shard
    `val_<domain>.bin` (and its manifest entry `val_<domain>`, which "docs" would share with
    the held-out documents' `val_docs`)."""
    seen = set()
    for d in docs:
        dom = d["domain"]
        if dom in seen:
            continue
        if not isinstance(dom, str) or not DOMAIN_RE.fullmatch(dom) or dom == "docs":
            raise ValueError(f"document {d['id']!r}: domain {dom!r} cannot name a validation "
                             "shard val_<domain>.bin; use letters, digits, '_', '-' and '.' "
                             "(not starting with '.', '_' or '-'), and not 'docs'")
        seen.add(dom)


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


def _chunk_digest(chunk: list[dict]) -> np.ndarray:
    """SHA-256 of a chunk's documents (ids and texts), kept with its encoded ids: a chunk
    file is reused only for the very documents it was encoded from."""
    h = hashlib.sha256()
    for d in chunk:
        for part in (d["id"], d["text"]):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _load_chunk(file: Path, digest: np.ndarray, n_docs: int, dtype):
    """(ids, offsets) of a chunk file written for the same documents, else None (missing,
    damaged, or from other documents: encoded again)."""
    if not file.is_file():
        return None
    try:
        with np.load(file) as saved:
            ids, offsets, got = saved["ids"], saved["offsets"], saved["digest"]
    except Exception:  # noqa: BLE001 - any unreadable chunk is encoded again
        return None
    if (not np.array_equal(got, digest) or ids.dtype != np.dtype(dtype)
            or offsets.shape != (n_docs + 1,) or offsets[0] != 0 or offsets[-1] != len(ids)
            or np.any(np.diff(offsets) < 0)):
        return None
    return ids, offsets


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
            try:
                return Tokenizer.load(folder)
            except Exception:  # noqa: BLE001 - a damaged file is trained again, not trusted
                pass
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
            digest = _chunk_digest(chunk)
            saved = _load_chunk(file, digest, len(chunk), dtype)
            if saved is not None:
                ids, offsets = saved
            else:
                lists = tokenizer.encode_batch([d["text"] for d in chunk])
                # A special token's text written in a document ("<|endoftext|>") stays text:
                # as an id it would cut the document in two inside the shard.
                specials = getattr(tokenizer, "special_token_texts", ())
                for j, d in enumerate(chunk):
                    if any(s in d["text"] for s in specials):
                        lists[j] = tokenizer.encode_text(d["text"])
                offsets = np.cumsum([0] + [len(x) for x in lists], dtype=np.int64)
                ids = np.concatenate([np.asarray(x, dtype=dtype) for x in lists] +
                                     [np.empty(0, dtype=dtype)])

                def save(tmp, ids=ids, offsets=offsets):
                    with open(tmp, "wb") as f:
                        np.savez(f, ids=ids, offsets=offsets, digest=digest)
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


def read_manifest(path: str | Path) -> dict:
    """The manifest.json at `path` (a file or the folder holding it); ValueError naming it
    when it is missing or not a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); "
                         "build or unpack the dataset again") from None
    if not isinstance(man, dict):
        raise ValueError(f"{path} is not a JSON object")
    return man


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name \
        and name not in (".", "..")


def check_build(out_dir: str | Path, verify: bool = True) -> tuple[dict, Tokenizer]:
    """(manifest, tokenizer) of the built dataset in `out_dir`, after checking that they
    agree with each other and with the files: every file the manifest lists is there (and,
    with `verify`, hashes as recorded), every shard holds exactly its token count in the
    manifest's dtype, and the tokenizer is the one the shards were written with. Raises
    ValueError naming the folder and what is wrong."""
    out_dir = Path(out_dir)
    man = read_manifest(out_dir / MANIFEST)
    where = out_dir / MANIFEST

    def bad(msg):
        return ValueError(f"{where}: {msg}; build or unpack the dataset again")

    if man.get("format") != FORMAT:
        raise bad(f"format {man.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(man.get("build_key"), str):
        raise bad("no build_key")
    itemsize = {"uint16": 2, "uint32": 4}.get(man.get("dtype"))
    if itemsize is None:
        raise bad(f"dtype {man.get('dtype')!r} is not uint16 or uint32")
    files, splits, tok = man.get("files"), man.get("splits"), man.get("tokenizer")
    if not isinstance(files, dict) or not files:
        raise bad("no files listed")
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), dict) \
            or not isinstance(splits.get("val"), dict):
        raise bad("the splits must hold 'train' and 'val'")
    if not isinstance(tok, dict):
        raise bad("no tokenizer entry")
    listed = {}
    for key, entry in files.items():
        if not isinstance(entry, dict) or not _plain_name(entry.get("file")) \
                or not isinstance(entry.get("sha256"), str):
            raise bad(f"files entry {key!r} needs a plain file name and a sha256")
        listed[entry["file"]] = entry["sha256"]
    shards = {"train": splits["train"], **{f"val {d}": e for d, e in splits["val"].items()}}
    for label, entry in shards.items():
        if not isinstance(entry, dict) or entry.get("file") not in listed:
            raise bad(f"split {label} names no file of the files list")
        if entry.get("sha256") != listed[entry["file"]]:
            raise bad(f"split {label}: sha256 differs from the files list's")
        if not isinstance(entry.get("tokens"), int) or entry["tokens"] < 1:
            raise bad(f"split {label}: token count {entry.get('tokens')!r}")
        if label != "train" and not isinstance(entry.get("bytes"), int):
            raise bad(f"split {label}: no byte count")
    if tok.get("file") not in listed:
        raise bad(f"tokenizer file {tok.get('file')!r} is not in the files list")
    for name, sha in listed.items():
        f = out_dir / name
        if not f.is_file():
            raise ValueError(f"{f} is missing; build or unpack the dataset again")
        if verify and sha256_file(f) != sha:
            raise ValueError(f"{f} does not match the SHA-256 in {where} (damaged or changed "
                             "after the build); build or unpack the dataset again")
    for label, entry in shards.items():
        f = out_dir / entry["file"]
        size = f.stat().st_size
        if size != entry["tokens"] * itemsize:
            raise ValueError(f"{f}: {size} bytes, the manifest says {entry['tokens']} tokens of "
                             f"{man['dtype']} ({entry['tokens'] * itemsize} bytes); build or "
                             "unpack the dataset again")
    try:
        tokenizer = Tokenizer.load(out_dir / tok["file"])
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types
        raise ValueError(f"{out_dir / tok['file']}: not a usable tokenizer ({err})") from None
    want = (tok.get("vocab_size"), tok.get("eot_id"), tok.get("sha256"))
    got = (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.sha256())
    if want != got:
        raise ValueError(f"{out_dir / tok['file']} is not the tokenizer in {where} (vocab size, "
                         f"end-of-text id, sha256 {got[0]}, {got[1]}, {got[2][:12]}…; the "
                         f"manifest says {want[0]}, {want[1]}, {str(want[2])[:12]}…); build or "
                         "unpack the dataset again")
    if tokenizer.vocab_size > np.iinfo(np.dtype(man["dtype"])).max + 1:
        raise bad(f"dtype {man['dtype']} cannot hold {tokenizer.vocab_size} token ids")
    return man, tokenizer


def up_to_date(out_dir: str | Path, build_key: str) -> bool:
    """True when `out_dir` holds a build of `build_key` whose files still hash as recorded
    and agree with its manifest (`check_build`)."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        return False
    try:
        if read_manifest(out_dir / MANIFEST).get("build_key") != build_key:
            return False
        check_build(out_dir)
    except ValueError:
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
    check_domains(docs)
    train, val = split_documents(docs, options.val_fraction)
    if not train:
        raise ValueError(f"all {len(docs)} documents went to validation; a build needs at "
                         "least two documents")
    if not val:  # nothing to evaluate on: `hwattn train` would fail at its final evaluation
        raise ValueError(f"no document was held out for validation: each of the "
                         f"{len({d['domain'] for d in docs})} domain(s) holds a single document "
                         "(after deduplication), and a domain's only document goes to training; "
                         "a build needs a domain with at least two documents")
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


def check_not_a_pack(out_dir: str | Path) -> None:
    """ValueError when `out_dir` is a file or holds a pack (`hwattn.data.pack`): a build
    written there replaces the pack's manifest.json and leaves a pack that no longer unpacks."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder")
    if (out_dir / PACK_FILE).is_file():
        raise ValueError(f"{out_dir} holds a pack ({PACK_FILE}); give the dataset a folder of "
                         "its own")


def head_build(src: str | Path, out: str | Path, train_tokens: int) -> dict:
    """Write to `out` the built dataset in `src` with its training shard cut to the first
    `train_tokens` tokens; the tokenizer and the validation shards are copied as they are.
    For work that needs the study's shapes and tokenizer but not its whole training set
    (timing a training step: `benchmarks/study_carry.sh head`), in a folder small enough to
    carry. Its build key is `src`'s with `-head<N>` appended, so no study run accepts it as
    its corpus. Returns the new manifest; raises ValueError when `src` does not check out or
    holds fewer training tokens."""
    src, out = Path(src), Path(out)
    man, _ = check_build(src)
    train = man["splits"]["train"]
    if isinstance(train_tokens, bool) or not isinstance(train_tokens, (int, np.integer)) \
            or not 1 <= train_tokens <= train["tokens"]:
        raise ValueError(f"train_tokens must be in [1, {train['tokens']}] (the training tokens "
                         f"of {src}), got {train_tokens!r}")
    train_tokens = int(train_tokens)
    if out.resolve() == src.resolve():
        raise ValueError(f"out must differ from src ({src})")
    check_not_a_pack(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a build there is gone from here on (write_build)
    itemsize = np.dtype(man["dtype"]).itemsize
    with open(src / train["file"], "rb") as f:
        head = f.read(train_tokens * itemsize)
    _atomic_write(out / train["file"], lambda tmp: tmp.write_bytes(head))
    for entry in man["files"].values():
        if entry["file"] != train["file"]:
            _atomic_write(out / entry["file"], lambda tmp, e=entry: shutil.copyfile(src / e["file"], tmp))
    sha = hashlib.sha256(head).hexdigest()
    man = json.loads(json.dumps(man))  # a copy
    man["build_key"] = f"{man['build_key']}-head{train_tokens}"
    man["splits"]["train"] = {"file": train["file"], "tokens": train_tokens, "sha256": sha,
                              "head_of": train["sha256"]}
    for entry in man["files"].values():
        if entry["file"] == train["file"]:
            entry["sha256"] = sha
    _atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(man, indent=1) + "\n"))
    check_build(out)
    return man

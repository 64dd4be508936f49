"""Where documents come from, and the whole `data build` pipeline over any of them.

- `registry_documents`: the packages of `hwattn.data.sources`, fetched with their clients.
- `embedded_documents`: the small public-domain corpus shipped in `hwattn/data/corpus/`.
- `jsonl_documents`: a local JSONL (or .jsonl.gz) file with a text field.
- `hf_documents`: a Hugging Face `datasets` dataset, streamed (e.g. FineWeb-Edu); `datasets`
  also reads local json / parquet / text files, which is how the tests exercise this path.

`build_dataset` runs any of them through deduplication, the split, the tokenizer and the
shard writer (`hwattn.data.build`).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from hwattn.data import build as B
from hwattn.data.extract import archive_files, extract, normalize
from hwattn.data.sources import SOURCES, WHISPER, Source, fetch, sha256_file, source_by_name
from hwattn.data.tokenizer import (MIN_BPE_VOCAB, R50K_SHA256, Tokenizer, gpt2_tokenizer,
                                   train_bpe)

EMBEDDED_LICENCE = "public domain (Project Gutenberg books; US State of the Union addresses)"


def registry_documents(sources: Iterable[Source], cache_dir: str | Path,
                       records: list[dict] | None = None, log=print) -> Iterator[dict]:
    """Documents of each source in turn; each archive is fetched first (or found in
    `cache_dir`), and a record of it (archive, sha256, licence) appended to `records`."""
    for s in sources:
        archive = fetch(s, cache_dir)
        digest = sha256_file(archive)
        log(f"{s.name}: {s.client} {s.package} -> {archive.name} (sha256 {digest[:12]})")
        if records is not None:
            records.append({"name": s.name, "client": s.client, "package": s.package,
                            "archive": archive.name, "archive_sha256": digest,
                            "domain": s.domain, "genre": s.genre, "licence": s.licence,
                            "max_chars": s.max_chars, "notes": s.notes})
        yield from extract(s, archive)


def embedded_files() -> list[Path]:
    root = resources.files("hwattn.data") / "corpus"
    return sorted(Path(str(p)) for p in root.iterdir() if str(p).endswith(".jsonl.gz"))


def embedded_documents() -> Iterator[dict]:
    """The documents of the corpus shipped inside the package."""
    files = embedded_files()
    if not files:
        raise ValueError("the embedded corpus is missing from this install (hwattn/data/corpus)")
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)


def check_input_file(path: str | Path) -> Path:
    """`path` as a Path if it is a readable regular file, else ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a JSONL file")
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def jsonl_documents(path: str | Path, text_field: str = "text", domain: str = "web",
                    source: str | None = None) -> Iterator[dict]:
    """Documents of a JSONL file (gzip allowed); `domain` and `source` fill missing fields.

    Every problem is a ValueError naming the file, the line and the field: a missing file,
    a truncated or corrupt .gz, bytes that are not UTF-8, a line that is not a JSON object,
    a missing text field or one that is not a string.
    """
    path = check_input_file(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0

    def string(value, field: str) -> str:
        value = str(value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate such as "\ud800" in the JSON
            raise ValueError(f"{path}:{line_no}: field {field!r} is not valid Unicode "
                             f"({err.reason} at character {err.start})") from None
        return value

    try:
        # Bytes, decoded line by line: an error names the line it is on (a text-mode reader
        # decodes blocks ahead of the line being read).
        with opener(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text ({err.reason} at byte "
                                     f"{err.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg} at column "
                                     f"{err.colno})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                     f"{type(rec).__name__}")
                if text_field not in rec:
                    raise ValueError(f"{path}:{line_no}: no field {text_field!r}")
                text = rec[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: field {text_field!r} must be a string, "
                                     f"got {'null' if text is None else type(text).__name__}")
                text = string(text, text_field)
                src = string(rec.get("source", source or path.stem), "source")
                yield {"id": string(rec.get("id", f"{src}/{line_no - 1}"), "id"), "source": src,
                       "domain": string(rec.get("domain", domain), "domain"),
                       "title": string(rec.get("title", ""), "title"), "text": normalize(text)}
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}: after line {line_no}: the gzip stream is truncated or "
                         f"corrupt ({err})") from None


def hf_documents(dataset: str, name: str | None = None, split: str = "train",
                 text_field: str = "text", domain: str = "web", limit: int | None = None,
                 data_files=None) -> Iterator[dict]:
    """Stream documents from a Hugging Face dataset (`datasets.load_dataset(..., streaming=True)`).

    `dataset` is a hub id such as "HuggingFaceFW/fineweb-edu" (with `name` "sample-10BT"), or a
    builder such as "json" with local `data_files`. Stops after `limit` documents.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("streaming needs the datasets package: pip install 'hwattn[train]'") from err
    ds = datasets.load_dataset(dataset, name, split=split, streaming=True, data_files=data_files)
    tag = dataset.rsplit("/", 1)[-1]
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        if text_field not in rec:
            raise ValueError(f"dataset {dataset!r} has no field {text_field!r}; fields: {list(rec)}")
        text = rec[text_field]
        if not isinstance(text, str):
            raise ValueError(f"dataset {dataset!r}, record {i}: field {text_field!r} must be a "
                             f"string, got {'null' if text is None else type(text).__name__}")
        yield {"id": str(rec.get("id", f"{tag}/{i}")), "source": tag, "domain": domain,
               "title": "", "text": normalize(text)}


def _local_data_files(data_files) -> dict[str, str]:
    """SHA-256 of each local file that `data_files` (a path, a glob or a list of them, or a
    dict of split -> those) names; remote URLs and names that match nothing are left out."""
    import glob

    if data_files is None:
        return {}
    if isinstance(data_files, dict):
        items = [x for v in data_files.values() for x in ([v] if isinstance(v, str) else v)]
    elif isinstance(data_files, str):
        items = [data_files]
    else:
        items = list(data_files)
    out = {}
    for item in items:
        for name in sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]:
            if Path(name).is_file():
                out[name] = sha256_file(name)
    return out


def gpt2_tiktoken_file(cache_dir: str | Path, path: str | Path | None = None) -> Path:
    """A hash-checked `gpt2.tiktoken`: `path` if given, else the one inside an installed
    `whisper` package, else extracted from the `openai-whisper` sdist fetched with pip."""
    if path is not None:
        return Path(path)
    try:
        import importlib.util
        spec = importlib.util.find_spec("whisper")
        if spec and spec.origin:
            cand = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
            if cand.is_file() and sha256_file(cand) == R50K_SHA256:
                return cand
    except (ImportError, ValueError):
        pass
    cache_dir = Path(cache_dir)
    target = cache_dir / "gpt2.tiktoken"
    if target.is_file() and sha256_file(target) == R50K_SHA256:
        return target
    archive = fetch(WHISPER, cache_dir)
    for name, data in archive_files(archive):
        if name.endswith("whisper/assets/gpt2.tiktoken"):
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            return target
    raise ValueError(f"{archive} holds no whisper/assets/gpt2.tiktoken")


def tokenizer_factory(spec: str, cache_dir: str | Path, gpt2_file: str | Path | None = None):
    """`spec` -> (factory(train_texts) -> Tokenizer, description for the build key).

    "gpt2": GPT-2 r50k from the rank file; "bpe:N": byte-level BPE of N ids trained on the
    training split; a path to a tokenizer.json: that tokenizer.
    """
    if spec == "gpt2":
        file = gpt2_tiktoken_file(cache_dir, gpt2_file)
        tok = gpt2_tokenizer(file)
        return (lambda texts: tok), {"kind": "gpt2", "sha256": R50K_SHA256}
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise ValueError(f"tokenizer spec bpe:N needs an integer N, got {spec!r}") from None
        if vocab < MIN_BPE_VOCAB:  # `train_bpe` would say so only after the corpus is read
            raise ValueError(f"tokenizer spec bpe:N needs N >= {MIN_BPE_VOCAB} (256 bytes, one "
                             f"merge, <|endoftext|>), got {spec!r}")
        return (lambda texts: train_bpe(texts, vocab)), {"kind": "bpe", "vocab_size": vocab}
    path = Path(spec)
    if path.exists():
        tok = Tokenizer.load(path)
        return (lambda texts: tok), {"kind": "file", "sha256": tok.sha256()}
    raise ValueError(f"tokenizer must be 'gpt2', 'bpe:N' or a tokenizer.json path, got {spec!r}")


def build_dataset(out_dir: str | Path, corpus: str = "embedded", tokenizer: str = "bpe:2048",
                  options: B.BuildOptions | None = None, sources: list[str] | None = None,
                  cache_dir: str | Path | None = None, gpt2_file: str | Path | None = None,
                  hf: dict | None = None, force: bool = False, progress: bool = True,
                  log=print) -> dict:
    """Build (or confirm up to date) a token dataset in `out_dir`; returns its manifest.

    corpus: "embedded" | "registry" | "jsonl:PATH" | "hf:DATASET" (streamed; `hf` holds
    name / split / text_field / domain / limit / data_files).
    """
    options = options or B.BuildOptions()
    out_dir = Path(out_dir)
    # Refused rather than ignored (as the CLI refuses the same options).
    if sources is not None and corpus != "registry":
        raise ValueError(f"sources only applies to corpus 'registry', not {corpus!r}")
    if sources is not None and not sources:
        raise ValueError("sources names no source; leave it out (None) to use all of them")
    if hf is not None and not corpus.startswith("hf:"):
        raise ValueError(f"hf only applies to an hf:DATASET corpus, not {corpus!r}")
    if gpt2_file is not None and tokenizer != "gpt2":
        raise ValueError(f"gpt2_file only applies to tokenizer 'gpt2', not {tokenizer!r}")
    B.check_not_a_pack(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir.parent / "raw"
    factory, tok_spec = tokenizer_factory(tokenizer, cache_dir, gpt2_file)
    records: list[dict] = []
    if corpus == "embedded":
        files = embedded_files()
        inputs = {"embedded": {f.name: sha256_file(f) for f in files}}
        records = [{"name": "embedded", "client": "-", "package": "hwattn/data/corpus",
                    "archive": f.name, "archive_sha256": inputs["embedded"][f.name],
                    "domain": f.name.split(".")[0], "licence": EMBEDDED_LICENCE,
                    "notes": "shipped with hwattn"} for f in files]
        docs_fn = embedded_documents
    elif corpus == "registry":
        names = set()
        for n in sources or [s.name for s in SOURCES]:
            if source_by_name(n) not in SOURCES:  # the GPT-2 rank file's package
                raise ValueError(f"source {n!r} holds no corpus; choose from "
                                 f"{[s.name for s in SOURCES]}")
            names.add(n)
        # In the order of SOURCES, each once: the build key records the set, and the
        # training shard holds the documents in source order.
        chosen = [s for s in SOURCES if s.name in names]
        # Fetch first, so that the build key covers the exact archives (and each source's
        # sampling and domain, which decide what is read from them).
        inputs = {"registry": {s.name: {"sha256": sha256_file(fetch(s, cache_dir)),
                                        "domain": s.domain, "max_chars": s.max_chars}
                               for s in chosen}}
        docs_fn = lambda: registry_documents(chosen, cache_dir, records, log)  # noqa: E731
    elif corpus.startswith("jsonl:"):
        path = check_input_file(corpus[6:])
        inputs = {"jsonl": {path.name: sha256_file(path)}}
        records = [{"name": path.stem, "client": "-", "package": str(path), "archive": path.name,
                    "archive_sha256": inputs["jsonl"][path.name], "domain": "web",
                    "licence": "as given by the file's owner", "notes": "local JSONL"}]
        docs_fn = lambda: jsonl_documents(path)  # noqa: E731
    elif corpus.startswith("hf:"):
        hf = dict(hf or {})
        name = corpus[3:]
        inputs = {"hf": {"dataset": name, **{k: str(v) for k, v in hf.items()}}}
        local = _local_data_files(hf.get("data_files"))
        if local:  # the files' content, not only their names, decides the build
            inputs["hf"]["data_files_sha256"] = local
        records = [{"name": name.rsplit("/", 1)[-1], "client": "datasets", "package": name,
                    "archive": "-", "archive_sha256": "-", "domain": hf.get("domain", "web"),
                    "licence": "see the dataset card", "notes": "streamed"}]
        docs_fn = lambda: hf_documents(name, **hf)  # noqa: E731
    else:
        raise ValueError(f"corpus must be embedded, registry, jsonl:PATH or hf:DATASET, got {corpus!r}")
    key = B.build_key(inputs, options, tok_spec)
    if not force and B.up_to_date(out_dir, key):
        log(f"{out_dir}: up to date (build {key[:12]}), nothing to do")
        B.remove_stale_folders(out_dir, log=log)  # e.g. the work folder of a build killed
        # after its manifest was written
        return json.loads((out_dir / B.MANIFEST).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = list(docs_fn())
    return B.write_build(out_dir, docs, factory, options, key, records, progress, log)


def make_embedded_corpus(cache_dir: str | Path, out_dir: str | Path,
                         books: tuple[str, ...] = ("carroll-alice", "burgess-busterbrown",
                                                   "bryant-stories", "blake-poems",
                                                   "chesterton-thursday"),
                         speech_every: int = 12) -> list[Path]:
    """Write the shipped corpus (books.jsonl.gz, speeches.jsonl.gz) from the registry
    packages: a few public-domain books and every `speech_every`-th State of the Union."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gut, sotu = source_by_name("gutenberg"), source_by_name("sotu")
    book_docs = [d for d in extract(gut, fetch(gut, cache_dir))
                 if d["id"].split("/")[1].split("#")[0] in books]
    speeches = [d for d in extract(sotu, fetch(sotu, cache_dir))]
    years = sorted({d["id"].split("/")[1].split("#")[0] for d in speeches})
    chosen = set(years[::speech_every])
    speech_docs = [d for d in speeches if d["id"].split("/")[1].split("#")[0] in chosen]
    written = []
    for name, docs in (("books", book_docs), ("speeches", speech_docs)):
        path = out_dir / f"{name}.jsonl.gz"
        buf = io.BytesIO()
        # mtime=0 keeps the file byte-identical across rebuilds.
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
            for d in docs:
                gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
        path.write_bytes(buf.getvalue())
        written.append(path)
    return written


__all__ = ["build_dataset", "embedded_documents", "hf_documents", "jsonl_documents",
           "make_embedded_corpus", "registry_documents", "tokenizer_factory"]

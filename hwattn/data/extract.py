"""From a package archive to clean documents: read the archive, pick the text files, strip
markup (reStructuredText, POD, dictd conventions, Gutenberg boilerplate) and cut long texts
into document-sized pieces at paragraph boundaries.

A document is a dict: {"id", "source", "domain", "title", "text"}.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path

from hwattn.data.sources import Source

# Long texts (books, dictionaries) become documents of about this many characters, cut at
# blank lines; the train / validation split then works on these pieces.
DOC_CHARS = 16_000


def archive_files(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(member name, content) of every regular file in a .tgz / .tar.gz / .whl / .deb."""
    path = Path(path)
    name = path.name
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, z.read(info)
    elif name.endswith(".deb"):
        yield from _tar_files(tarfile.open(fileobj=io.BytesIO(_deb_data_tar(path))))
    elif name.endswith((".tgz", ".tar.gz", ".tar")):
        with tarfile.open(path) as t:
            yield from _tar_files(t)
    else:
        raise ValueError(f"unsupported archive type: {path}")


def _tar_files(t: tarfile.TarFile) -> Iterator[tuple[str, bytes]]:
    for m in t:
        if m.isfile():
            yield m.name.lstrip("./"), t.extractfile(m).read()


def _deb_data_tar(path: Path) -> bytes:
    """The data.tar member of a Debian package (an `ar` archive), decompressed to a tar."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        data = blob[pos + 60:pos + 60 + size]
        if member.startswith("data.tar"):
            if member.endswith(".xz"):
                import lzma
                return lzma.decompress(data)
            if member.endswith(".gz"):
                return gzip.decompress(data)
            if member == "data.tar":
                return data
            raise ValueError(f"{path}: unsupported compression of {member}")
        pos += 60 + size + (size & 1)
    raise ValueError(f"{path}: no data.tar member")


def normalize(text: str, keep_tabs: bool = False) -> str:
    """NFC, Unix newlines, no trailing spaces, at most one blank line in a row; tabs become
    four spaces unless `keep_tabs` (source code, where a tab is one token, not four)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\ufeff", "")
    if not keep_tabs:
        text = text.replace("\t", "    ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_long(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut `text` into pieces of at most about `max_chars` characters, at blank lines where
    possible, else at line ends, else after sentences."""
    if len(text) <= max_chars:
        return [text]
    for sep in ("\n\n", "\n", ". "):
        parts = text.split(sep)
        if len(parts) > 1 and max(len(p) for p in parts) <= max_chars:
            break
    pieces, cur, size = [], [], 0
    for part in parts:
        if cur and size + len(part) > max_chars:
            pieces.append(sep.join(cur))
            cur, size = [], 0
        cur.append(part)
        size += len(part) + len(sep)
    if cur:
        pieces.append(sep.join(cur))
    return pieces


_RST_UNDERLINE = re.compile(r"^([=\-~^*#+`'\".:_])\1{2,}$")
_RST_ROLE = re.compile(r":[\w:.+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")


def strip_rst(text: str) -> str:
    """reStructuredText to plain text: drop section underlines, comments, substitution and
    option lines of directives; keep directive bodies (code, notes); unwrap roles and links."""
    out, skip_comment = [], False
    for line in text.split("\n"):
        s = line.strip()
        if skip_comment:
            if s and not line.startswith((" ", "\t")):
                skip_comment = False
            else:
                continue
        if _RST_UNDERLINE.match(s):
            continue
        if s.startswith(".. "):
            m = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)", s)
            if m:  # a directive: keep its argument (a title, a function signature)
                if m.group(2) and m.group(1) not in ("image", "figure", "include", "toctree",
                                                     "literalinclude", "kernel-doc", "highlight"):
                    out.append(m.group(2))
                continue
            skip_comment = True  # comment, target or substitution definition
            continue
        if re.match(r"^\s+:[\w-]+:", line):  # a directive's option line
            continue
        out.append(line)
    text = "\n".join(out)
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LINK.sub(r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"::[ \t]*$", ":", text, flags=re.M)
    return text


_POD_CODE = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>", re.S)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def strip_pod(text: str) -> str:
    """Perl POD to plain text: headings keep their words, commands go, formatting codes
    (B<>, C<>, I<>, L<text|target>, E<gt>, ...) are replaced by their text."""
    out, in_begin = [], False
    for line in text.split("\n"):
        if line.startswith("=begin"):
            in_begin = True
            continue
        if line.startswith("=end"):
            in_begin = False
            continue
        if in_begin:
            continue
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            if cmd.startswith(("=head", "=item")) and rest.strip() not in ("", "*"):
                out.append(rest.strip())
            continue
        out.append(line)
    text = "\n".join(out)

    def code(m):
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        letter = m.group(0)[0]
        if letter == "E":
            return _POD_ESCAPES.get(inner, chr(int(inner)) if inner.isdigit() else inner)
        if letter in "ZX":
            return ""
        if letter == "L":
            return inner.split("|", 1)[0] if "|" in inner else inner.split("/", 1)[-1].strip('"')
        return inner

    for _ in range(4):  # nested codes unwrap from the inside out
        text, n = _POD_CODE.subn(code, text)
        if not n:
            break
    return text


_GUT_START = re.compile(r"\*\*\*\s*START OF.*?\*\*\*|\*END\*THE SMALL PRINT.*?\n", re.I)
_GUT_END = re.compile(r"\*\*\*\s*END OF|End of (the )?Project Gutenberg|End of this Project Gutenberg",
                      re.I)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg etext: without the licence header and footer."""
    m = _GUT_START.search(text)
    if m and m.end() < len(text) // 2:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m and m.start() > len(text) // 2:
        text = text[:m.start()]
    return text


def strip_gcide(text: str) -> str:
    """A stretch of the GCIDE dictd database to readable definitions: no source tags
    ([1913 Webster]), no pronunciation between backslashes, no cross-reference braces."""
    text = re.sub(r"^\s*\[(?:1913 Webster|WordNet [\d.]+|PJC|Century Dict\.|Webster 1913 Suppl\.)"
                  r"[^\]]*\]\s*$", "", text, flags=re.M)
    text = re.sub(r"\\[^\\\n]{1,60}\\", "", text)
    text = text.replace("{", "").replace("}", "")
    return "\n".join(ln.strip() for ln in text.split("\n"))


def _wordnet_lines(data: bytes, pos: str) -> Iterator[str]:
    for line in data.decode("utf-8", "replace").split("\n"):
        if not line or line.startswith("  "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        n_words = int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        words = [re.sub(r"\(\w+\)$", "", w) for w in words]
        yield f"{', '.join(words)} ({pos}): {gloss.strip()}"


def _doc(source: Source, key: str, text: str, title: str = "", domain: str | None = None) -> dict:
    return {"id": f"{source.name}/{key}", "source": source.name,
            "domain": domain or source.domain, "title": title, "text": text}


def _pieces(source: Source, key: str, text: str, title: str = "", domain: str | None = None,
            keep_tabs: bool = False) -> Iterator[dict]:
    text = normalize(text, keep_tabs)
    for i, piece in enumerate(split_long(text)):
        if piece.strip():
            yield _doc(source, f"{key}#{i}", piece, title, domain)


def _grouped(source: Source, key: str, items: list[str], per_doc_chars: int = DOC_CHARS,
             sep: str = "\n\n") -> Iterator[dict]:
    cur, size, k = [], 0, 0
    for item in items:
        cur.append(item)
        size += len(item)
        if size >= per_doc_chars:
            yield _doc(source, f"{key}#{k}", normalize(sep.join(cur)))
            cur, size, k = [], 0, k + 1
    if cur:
        yield _doc(source, f"{key}#{k}", normalize(sep.join(cur)))


def extract(source: Source, archive: str | Path) -> Iterator[dict]:
    """Documents of one source from its downloaded archive."""
    fn = _EXTRACTORS.get(source.name)
    if fn is None:
        raise ValueError(f"no extractor for source {source.name!r}")
    yield from fn(source, archive)


def _gutenberg(source, archive):
    for name, data in sorted(archive_files(archive)):
        if "/gutenberg/" in name and name.endswith(".txt"):
            text = data.decode("utf-8", "replace")
            first, _, rest = text.partition("\n")
            title = first.strip("[] ") if first.startswith("[") else Path(name).stem
            yield from _pieces(source, Path(name).stem, rest if first.startswith("[") else text,
                               title)


def _shakespeare(source, archive):
    for name, data in sorted(archive_files(archive)):
        if "/texts/" not in name or not name.endswith("_gut.txt"):
            continue  # *_gut_f.txt are First Folio spellings of the same plays
        text = strip_gutenberg(data.decode("latin-1"))
        yield from _pieces(source, Path(name).stem, text, Path(name).stem.replace("_gut", ""))


def _sotu(source, archive):
    for name, data in sorted(archive_files(archive)):
        if "/data/" in name and name.endswith(".json"):
            rec = json.loads(data)
            title = f"{rec.get('name', '')} {rec.get('year', '')}".strip()
            yield from _pieces(source, Path(name).stem, rec["text"], title)


def _wiki(source, archive):
    for name, data in archive_files(archive):
        if name.endswith("summaries_en-us.json"):
            for key, rec in sorted(json.loads(data).items()):
                text = rec.get("extract", "").strip()
                if text:
                    yield _doc(source, key, normalize(f"{rec.get('title', key)}\n\n{text}"),
                               rec.get("title", key))


def _rst_docs(prefix: str, skip: tuple[str, ...]):
    def fn(source, archive):
        for name, data in sorted(archive_files(archive)):
            if prefix in name and name.endswith(".txt") and not any(s in name for s in skip):
                rel = name.split(prefix, 1)[1]
                text = strip_rst(data.decode("utf-8", "replace"))
                yield from _pieces(source, rel.removesuffix(".rst.txt").removesuffix(".txt"),
                                   text, rel)
    return fn


def _perl_doc(source, archive):
    for name, data in sorted(archive_files(archive)):
        if "/pod/" in name and name.endswith(".pod"):
            yield from _pieces(source, Path(name).stem, strip_pod(data.decode("utf-8", "replace")),
                               Path(name).stem)


def _gcide(source, archive):
    for name, data in archive_files(archive):
        if name.endswith("gcide.dict.dz"):
            text = gzip.decompress(data).decode("utf-8", "replace")
            start = text.find("\n\nA \\A\\")  # the first entry; before it is the database header
            text = strip_gcide(text[max(start, 0):])
            yield from _pieces(source, "gcide", text)


def _wordnet(source, archive):
    files = dict(archive_files(archive))
    for pos in ("noun", "verb", "adj", "adv"):
        data = next((v for k, v in files.items() if k.endswith(f"wordnet/data.{pos}")), None)
        if data is not None:
            yield from _grouped(source, pos, list(_wordnet_lines(data, pos)), sep="\n")


def _fortunes(source, archive):
    for name, data in sorted(archive_files(archive)):
        if "/games/fortunes/" in name and "." not in Path(name).name:
            items = [f.strip() for f in data.decode("utf-8", "replace").split("\n%\n") if f.strip()]
            yield from _grouped(source, Path(name).name, items)


# Source files larger than this are generated tables (register maps, firmware arrays), not
# code anyone wrote; so are files whose lines are mostly #define.
MAX_CODE_FILE_BYTES = 128 * 1024
MAX_DEFINE_SHARE = 0.5


def is_written_code(text: str) -> bool:
    """False for generated C: files over MAX_CODE_FILE_BYTES or mostly `#define` lines."""
    if len(text) > MAX_CODE_FILE_BYTES:
        return False
    lines = text.count("\n") + 1
    defines = sum(1 for ln in text.split("\n") if ln.startswith("#define"))
    return defines <= MAX_DEFINE_SHARE * lines


def path_order(path: str) -> bytes:
    """The fixed pseudo-random order `Source.max_chars` samples files in."""
    return hashlib.sha256(path.encode()).digest()


def _linux_source(source, archive):
    """The kernel tree inside linux-source-6.1 (a .tar.xz inside the .deb): C files and
    headers as domain code, Documentation/*.txt as prose; files sampled by `path_order`
    up to `source.max_chars`, then read in path order."""
    inner = next((data for name, data in archive_files(archive)
                  if name.startswith("usr/src/linux-source") and name.endswith(".tar.xz")), None)
    if inner is None:
        raise ValueError(f"{archive}: no usr/src/linux-source-*.tar.xz inside")
    code, prose = [], []
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r|xz") as t:
        for m in t:
            if not m.isfile():
                continue
            rel = m.name.split("/", 1)[-1]
            is_code = rel.endswith((".c", ".h")) and not rel.startswith("Documentation/")
            is_doc = rel.startswith("Documentation/") and rel.endswith(".txt")
            if not (is_code or is_doc) or m.size > MAX_CODE_FILE_BYTES:
                continue
            try:
                text = t.extractfile(m).read().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if is_code and is_written_code(text):
                code.append((rel, text))
            elif is_doc:
                prose.append((rel, text))
    chosen = sorted(code, key=lambda f: path_order(f[0]))
    if source.max_chars:
        total, cut = 0, len(chosen)
        for i, (_, text) in enumerate(chosen):
            if total >= source.max_chars:
                cut = i
                break
            total += len(text)
        chosen = chosen[:cut]
    for rel, text in sorted(chosen):
        yield from _pieces(source, rel, text, rel, keep_tabs=True)
    for rel, text in sorted(prose):
        yield from _pieces(source, rel, text, rel, domain="prose")


_EXTRACTORS = {
    "gutenberg": _gutenberg,
    "shakespeare": _shakespeare,
    "sotu": _sotu,
    "wiki": _wiki,
    "linux-doc": _rst_docs("html/_sources/", ("translations/",)),
    "python-doc": _rst_docs("html/_sources/", ("changelog",)),
    "perl-doc": _perl_doc,
    "gcide": _gcide,
    "wordnet": _wordnet,
    "fortunes": _fortunes,
    "linux-source": _linux_source,
}

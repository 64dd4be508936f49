"""lm-evaluation-harness task files for local JSONL items, written without importing lm-eval.

One YAML per JSONL file, read by the harness through `datasets`' local json builder (nothing is
downloaded). Rows with "context", "choices" and "gold" become a `multiple_choice` task (acc,
acc_norm); rows with "context" and "target" a `loglikelihood` task (acc: the target is the
greedy continuation; perplexity). For `hwattn eval --write-tasks DIR`'s cloze items the
YAML begins

    task: hwattn_cloze
    dataset_path: json
    dataset_kwargs:
      data_files: {"test": "/abs/DIR/cloze.jsonl"}
    test_split: test
    output_type: loglikelihood

and docs/transformers.md shows it whole. Then `lm_eval --model hwattn --model_args
pretrained=CKPT --tasks hwattn_cloze --include_path DIR` runs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# The task names `write_tasks` gives the items of `hwattn.eval.suite.build_tasks`.
TASK_NAMES = {"cloze": "hwattn_cloze", "mc": "hwattn_mc"}


# Plain words YAML reads as something other than a string.
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def task_yaml(name: str, path: Path) -> str:
    """The harness's task YAML for the JSONL file `path` (its first row decides the kind)."""
    rows = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"task {name}: {path} has no rows")
    try:
        first = json.loads(rows[0])
    except ValueError as err:
        raise ValueError(f"task {name}: the first row of {path} is not JSON ({err})") from None
    if not isinstance(first, dict):  # `"context" in first` was a substring test on a string
        raise ValueError(f"task {name}: the rows of {path} must be JSON objects, the first is "
                         f"{type(first).__name__}")
    files = json.dumps({"test": str(Path(path).resolve())})
    # A name other than letters, digits and _.- is quoted (JSON is YAML): "a: b" made a
    # YAML error, "x #2" the task "x", "123" a number.
    plain = re.fullmatch(r"[A-Za-z_][\w.\-]*", name) and name.lower() not in _YAML_WORDS
    head = (f"task: {name if plain else json.dumps(name)}\ndataset_path: json\ndataset_kwargs:\n"
            f"  data_files: {files}\ntest_split: test\n")
    if "choices" in first and "gold" in first:
        return head + ("output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
                       "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\n"
                       "target_delimiter: \"\"\nmetric_list:\n"
                       "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    if "context" in first and "target" in first:
        return head + ("output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
                       "doc_to_target: \"{{target}}\"\ntarget_delimiter: \"\"\nmetric_list:\n"
                       "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                       "  - metric: perplexity\n    aggregation: perplexity\n"
                       "    higher_is_better: false\n")
    raise ValueError(f"{path}: rows need context+target or context+choices+gold, got {list(first)}")


def local_tasks(tasks: dict[str, str | Path], directory: str | Path) -> Path:
    """Write one harness task YAML per {task name: JSONL path} into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in tasks.items():
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"task {name}: no such file {path}")
        (directory / f"{name}.yaml").write_text(task_yaml(name, path))
    return directory


def write_tasks(items: dict[str, list[dict]], directory: str | Path) -> dict[str, Path]:
    """`items` ({"cloze": [...], "mc": [...]}, from `build_tasks`) as `<kind>.jsonl` plus the
    task YAML named in `TASK_NAMES`, in `directory`; returns {task name: JSONL path} of the
    kinds that have items."""
    from hwattn.eval.tasks import write_jsonl

    directory = Path(directory)
    written = {}
    for kind, rows in items.items():
        if rows:
            written[TASK_NAMES[kind]] = write_jsonl(rows, directory / f"{kind}.jsonl")
    local_tasks(written, directory)
    return written

"""matplotlib for the library's figures: they are always files, never shown, so every figure
is drawn on the Agg backend (no display needed, the same output on any machine).

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    save_figure(fig, "out/plot.png")   # folder made if missing; the figure closed
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: matplotlib is an extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """Write `fig` to `path` (its folder made if missing), close it and return the path. The
    file is replaced whole (`hwattn.files.replace_file`): a drawing that fails leaves an
    earlier figure of that name as it was, not a cut one."""
    from hwattn.files import replace_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_file(path, lambda tmp: fig.savefig(tmp, **savefig_kwargs))
    finally:
        pyplot().close(fig)
    return path

"""When each Triton kernel in a cache directory was compiled: one line per compiled variant
(its file time, kernel name), oldest first, with counts per kernel name. Run a serving
benchmark with a fresh TRITON_CACHE_DIR, then this over it: compiles after the engine's
start-up are JIT stalls in serving steps (a second or so each).

    TRITON_CACHE_DIR=/tmp/tc python3 benchmarks/engine_roofline.py --parts ttft ...
    python3 benchmarks/jit_timeline.py /tmp/tc [--after HH:MM:SS]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path


def compiled(cache: Path) -> list[tuple[float, str]]:
    """(mtime, kernel name) of every compiled variant's metadata file under `cache`."""
    out = []
    for path in cache.glob("*/*.json"):
        if path.name.startswith("__grp__"):
            continue
        try:
            name = json.loads(path.read_text()).get("name", path.stem)
        except (OSError, ValueError):
            name = path.stem
        out.append((path.stat().st_mtime, name))
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path, help="the TRITON_CACHE_DIR the run used")
    p.add_argument("--after", default=None, help="count only compiles after this local HH:MM:SS")
    args = p.parse_args()
    rows = compiled(args.cache)
    if args.after:
        rows = [(t, n) for t, n in rows if time.strftime("%H:%M:%S", time.localtime(t)) > args.after]
    for t, name in rows:
        print(f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03d} {name}")
    print("per kernel:", dict(Counter(n for _, n in rows).most_common()))


if __name__ == "__main__":
    main()

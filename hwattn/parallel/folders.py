"""The socket folder a `WorkerGroup`'s workers connect through: `hwattn-PID-*` in the
temporary directory, mode 0700 (only this user can enter it), named after the process that
made it, so that the folder of a parent killed during start-up can be told and removed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def sweep_stale_folders(root: str | None = None) -> list[str]:
    """Remove this user's socket folders (`hwattn-PID-*` under `root`, default the temporary
    directory) whose process is gone: what a parent killed during start-up left. Returns them."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(r"hwattn-([0-9]+)-[^/]+", entry.name)
        try:
            if match is None or not entry.is_dir(follow_symlinks=False) \
                    or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def make_socket_folder() -> str:
    """A new socket folder for this process (stale ones swept first); its path."""
    sweep_stale_folders()
    # mode 0700: only we can connect. Named after this process, so that a later group can
    # tell a folder whose owner was killed before removing it.
    return tempfile.mkdtemp(prefix=f"hwattn-{os.getpid()}-")

"""Running `hopper_decode.py`'s tasks in worker processes the parent watches.

A task is a string "kind:name:kernel" (or "peaks"); a worker runs its tasks in order and prints
one line "RESULT {json}" per task. `run_tasks` starts a worker (`spawn(tasks, peaks)` returns the
process, its stderr in a file at `proc.log`), waits for each result with a timeout, and when a
task crashes or hangs the worker it reports that task, skips every later task of the same
Hopper variant and starts a fresh worker for the rest. `run_parallel` runs several task lists
side by side (compiles and checks; timings always run alone).
"""

from __future__ import annotations

import json
import queue
import subprocess
import tempfile
import threading
import time

from hopper_report import summary

OURS = ("triton", "gqa")  # kernels that are not Hopper variants: never dropped after a crash


def start_worker(cmd: list[str], env: dict) -> subprocess.Popen:
    """A worker process whose stdout the parent reads; stderr goes to a file (a chatty worker
    must never block on a full pipe), kept at `proc.log`."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    proc.log = log
    return proc


def stderr_tail(proc) -> str:
    log = getattr(proc, "log", None)
    if log is None:
        return proc.stderr.read()[-1500:] if proc.stderr else ""
    log.seek(0)
    return log.read()[-1500:]


def kernel_of(task: str) -> str:
    return task.split(":")[-1]


def _lines(proc) -> queue.Queue:
    """The worker's stdout lines on a queue (None at its end), read by a thread so that the
    parent can wait for the next one with a timeout."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def run_tasks(tasks, spawn, task_timeout: float, deadline: float) -> list[dict]:
    """Run `tasks` in a worker from `spawn`; when a task crashes or hangs the worker, it is
    reported, every later task of the same Hopper variant is skipped, and a fresh worker takes
    the rest. Tasks left at `deadline` are reported as not run."""
    results, pending, peaks = [], list(tasks), None
    while pending and time.time() < deadline:
        proc = spawn(pending, peaks)
        lines = _lines(proc)
        while pending:
            try:
                line = lines.get(timeout=max(1.0, min(task_timeout, deadline - time.time())))
            except queue.Empty:
                line, reason = None, "timed out"
            else:
                reason = None if line is not None else "worker died"
            if line is not None:
                if line.startswith("RESULT "):
                    row = json.loads(line[len("RESULT "):])
                    results.append(row)
                    pending.pop(0)
                    print(summary(row), flush=True)
                    if row.get("task") == "peaks" and "copy_GBps" in row:
                        peaks = (row["copy_GBps"], row["mm_TFLOPs"])
                continue  # other lines are a library's chatter
            proc.kill()
            code = proc.wait()
            stderr = stderr_tail(proc)
            task = pending.pop(0)
            reason = reason if reason == "timed out" else f"{reason} (exit {code})"
            row = dict(task=task, error=f"{reason}: {stderr}")
            results.append(row)
            print(summary(row), flush=True)
            kernel = kernel_of(task)
            if kernel not in OURS:
                dropped = [t for t in pending if kernel_of(t) == kernel]
                pending = [t for t in pending if kernel_of(t) != kernel]
                results += [dict(task=t, error=f"skipped: {kernel} {reason} on {task}") for t in dropped]
            break
        else:
            proc.wait()
    results += [dict(task=t, error="not run: out of time") for t in pending]
    return results


def run_parallel(task_lists, spawn, task_timeout: float, deadline: float) -> list[dict]:
    """run_tasks on each list in its own worker, side by side (compiles and correctness checks,
    never timings: those run alone)."""
    results: list[list[dict]] = [[] for _ in task_lists]

    def run(i):
        results[i] = run_tasks(task_lists[i], spawn, task_timeout, deadline)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(task_lists))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [row for rows in results for row in rows]


def crashed(rows) -> set[str]:
    """Hopper variants whose worker crashed or hung on some task."""
    return {kernel_of(r["task"]) for r in rows if "error" in r
            and r["error"].startswith(("timed out", "worker died"))
            and kernel_of(r["task"]) not in OURS}

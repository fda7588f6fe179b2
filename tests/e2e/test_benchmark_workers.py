"""The missing-modality benchmark's pool workers end when the benchmark process is killed.

Killing the benchmark left its workers training for half an hour, unrecorded, on the cores the
restarted benchmark needed and in the run directories it resumed. The watchdog a worker starts
(``_exit_with_parent``) is what stops them; here a real process tree stands in for the pool: a
parent process starts a child that runs the watchdog, and the child must outlive nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The parent: start the watched child (passing its own pid), report the child's pid, wait for a
# line on stdin, then exit without waiting for the child (as a killed benchmark leaves workers).
PARENT = f"""
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {{child!r}}, str(os.getpid())], cwd={str(ROOT)!r})
print(child.pid, flush=True)
sys.stdin.readline()
"""
# The child says when its watchdog runs (after the slow import), through the shared stdout.
CHILD = """
import sys, threading, time
from benchmarks.missing_modality import _exit_with_parent
threading.Thread(target=_exit_with_parent, args=(int(sys.argv[1]), 0.05), daemon=True).start()
print("watching", flush=True)
time.sleep(120)  # the watchdog ends the process long before
"""


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_ends_when_the_benchmark_process_is_gone() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(child=CHILD)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert _running(child), "the watchdog must not end a worker whose parent is alive"
        parent.stdin.write("exit\n")
        parent.stdin.flush()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the worker outlived the benchmark process"
    finally:
        parent.kill()
        if "child" in locals() and _running(child):
            subprocess.run(["kill", "-9", str(child)], check=False)

"""Atomic outputs: every step writes to a temporary sibling and renames it into place.

A killed or failing step therefore leaves either the previous output or nothing, never a
half-written store that a later step would read as valid.

A step killed with SIGKILL cannot remove its own temporary sibling, so temporaries are named
``.<target>.tmp-p<pid>@<host>-<random>`` (and ``.<target>.old-p<pid>@<host>``): the next writer of
the same target removes those whose owner process is dead on this host, and only those (a live
owner, another host or a foreign name is left alone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def _owner_tag() -> str:
    return f"p{os.getpid()}@{_host()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:  # a zombie has exited; only its exit status is left
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove ``target``'s temporaries left by dead processes on this host; returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    name = re.escape(target.name)
    # mkdtemp/mkstemp append [a-z0-9_] characters; the .old- sibling has no suffix.
    pattern = re.compile(rf"^\.{name}\.(?:tmp-p(\d+)@(.+)-[a-z0-9_]+|old-p(\d+)@(.+))$")
    host, removed = _host(), []
    for cand in target.parent.iterdir():
        m = pattern.match(cand.name)
        if m is None:
            continue
        pid, owner_host = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if owner_host != host or pid_alive(int(pid)):
            continue
        try:
            if cand.is_dir() and not cand.is_symlink():
                shutil.rmtree(cand)
            else:
                cand.unlink()
        except FileNotFoundError:
            continue  # another writer cleaned it first
        except OSError as exc:
            log.warning("could not remove stale temporary %s: %s", cand, exc)
            continue
        log.warning("removed %s, left by dead process %s", cand, pid)
        removed.append(cand)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{_owner_tag()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; it is renamed onto ``target`` on success.

    The caller writes the file itself (``mode`` is informational); this keeps the helper usable
    with writers that want a path (pyarrow, pandas, matplotlib) as well as with ``open``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def write_text(target: str | Path, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text)

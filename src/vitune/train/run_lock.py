"""One run at a time per output folder.

Two runs writing checkpoints into the same `train.output_dir` would overwrite each other's
files and rotate each other's checkpoints away. `output_dir_lock` takes an OS lock
(`fcntl.flock`) on a small file beside the folder, `.<name>.vitune-lock`, before anything is
written. It lies beside the folder, not in it, so `train.overwrite` (which deletes the
folder) cannot delete it, and an empty new folder stays empty. The kernel drops the lock
when its process ends, however it ends (even kill -9), so a stale lock never blocks a run;
the file only says which PID holds it, and is removed on a normal release. Where the folder
already exists in a parent this user cannot write (a volume mounted at /output), the lock is
taken on the folder itself instead, without a PID.

Under `accelerate launch` only the main process locks: the other ranks are the same run.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vitune.errors import UserError


def lock_file(output_dir: Path) -> Path:
    """The lock file of a run folder: beside it, named after it (symlinks resolved)."""
    folder = Path(os.path.expanduser(str(output_dir))).resolve()
    return folder.parent / f".{folder.name}.vitune-lock"


@contextmanager
def output_dir_lock(output_dir: Path, main_process: bool = True) -> Iterator[None]:
    """Hold `output_dir` for this run; raise UserError naming the other run's PID when it is held."""
    if not main_process:
        yield
        return
    path = lock_file(output_dir)
    try:
        fd = _acquire(path, output_dir)
    except PermissionError:
        if not Path(output_dir).is_dir():
            raise
        path, fd = None, _lock(os.open(output_dir, os.O_RDONLY), output_dir)
    try:
        yield
    finally:
        if path is not None:
            path.unlink(missing_ok=True)  # while still locked: whoever opens the name next gets a fresh file
        os.close(fd)


def _lock(fd: int, output_dir: Path) -> int:
    """flock `fd` or close it and refuse, naming the PID written in it (if any)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
        except IsADirectoryError:
            holder = ""
        os.close(fd)
        who = f"PID {holder}" if holder.isdigit() else "PID unknown"
        raise UserError(f"train.output_dir {output_dir} is in use by another vitune run ({who}); "
                        "wait for it to finish or choose another train.output_dir") from None
    return fd


def _acquire(path: Path, output_dir: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _lock(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), output_dir)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and removed this file between our open and lock: try again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd

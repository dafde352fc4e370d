"""Model folders with the permissions the user's umask gives, readable by whoever the umask allows.

Two writers underneath vitune make files owner-only: safetensors writes each `.safetensors`
through a temporary file (mode 0600), and `tempfile.mkdtemp`, which gives a folder that is
renamed into place when complete, makes it 0700. A serving container with another uid, another
account or a shared team folder could then not read a merged model, an adapter or a converted
model. `umask_modes(folder)` is called on each such folder once it is written, before it is
renamed into place where there is a rename.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it in /proc (elsewhere it is
    set and put back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(path: Path) -> None:
    """Give `path`, and every folder and file under it, the mode that mkdir and open() give under
    the umask: 0777 & ~umask for folders (and files their owner may run), 0666 & ~umask for other
    files. Symbolic links are left alone, and so are the files they point to."""
    mask = current_umask()
    for item in [path, *Path(path).rglob("*")] if Path(path).is_dir() else [Path(path)]:
        mode = os.lstat(item).st_mode
        if stat.S_ISLNK(mode):
            continue
        full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
        if stat.S_IMODE(mode) != full & ~mask:
            os.chmod(item, full & ~mask)

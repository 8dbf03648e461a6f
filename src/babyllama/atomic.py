"""Atomic file writes: a reader (or a resumed run) never sees half a file.

Everything is written to a temporary file in the same directory, flushed to disk, then moved
over the target with `os.replace`, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from babyllama.errors import UserError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and some writers, safetensors among them) create files private (0600); the
        # result gets a plain file's mode (0644 under the usual umask): runs and exports are
        # meant to be shared.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; read once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished temporary directory into place; an old `out_dir` is removed only after
    the new one is there, so a crash leaves one complete version."""
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def check_output_dir(out_dir: Path, marker: str, ours: re.Pattern) -> None:
    """Refuse an output directory whose contents a run would delete.

    The output replaces `out_dir` whole, so `out_dir` must not exist, be empty, or hold an
    earlier output of the same kind: its `marker` file and only names matching `ours` (a
    trained run, or notes a user keeps there, would otherwise be lost without a word).
    Raises UserError "DIR: exists and holds other files (e.g. NAME); choose another -o", or
    "DIR: exists and is not a directory" for a file.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory; choose another -o")
    names = sorted(p.name for p in out_dir.iterdir())
    others = [n for n in names if not ours.fullmatch(n)] if marker in names else names
    if others:
        raise UserError(f"{out_dir}: exists and holds other files (e.g. {others[0]}); "
                        f"choose another -o")

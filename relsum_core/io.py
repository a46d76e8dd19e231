"""Atomic file writes: a crash mid-write never leaves a half-written output behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _new_file_mode() -> int:
    # mkstemp makes 0600 files; a plain open() would have given 0666 less the umask.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_dir(dest: str | os.PathLike, fill) -> Path:
    """Create directory ``dest`` by calling ``fill(tmp_dir)`` on a temp dir beside it, then renaming.

    A crash mid-write leaves the previous ``dest`` intact (at worst a stray ``.NAME.tmp-*``).  The
    old directory is moved aside first because POSIX rename will not replace a non-empty directory.
    """
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


class JsonlLog:
    """Append-only JSONL metrics, flushed per line so a crash loses at most the line being written."""

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        import json
        import time

        self.f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

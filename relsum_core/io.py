"""Atomic file writes: a crash mid-write never leaves a half-written output behind."""

from __future__ import annotations

import json
import math
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


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_report(obj) -> str:
    """Indented strict JSON for reports: NaN and +-inf (the NDCG of a query with no relevant product,
    the standard error of one value) become null, which jq and JavaScript parse, unlike bare NaN."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from a record file (settings, training records); ValueError naming the file when
    it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (itself included) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or file system has no such call."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_dir(dest: str | os.PathLike, fill) -> Path:
    """Create directory ``dest`` by calling ``fill(tmp_dir)`` on a temp dir beside it, then renaming.

    The new files are on disk before the rename.  Replacing an existing ``dest`` swaps the two
    directories in one atomic step on Linux (renameat2), so a crash at any point leaves either the
    old or the new ``dest`` (at worst a stray ``.NAME.tmp-*`` beside it).  Elsewhere the old one is
    first moved aside (POSIX rename will not replace a non-empty directory): a crash between the two
    renames leaves it at ``.NAME.old-PID``.
    """
    import shutil

    dest = Path(dest)
    here = Path.cwd().resolve()
    if dest.exists() and (here == dest.resolve() or dest.resolve() in here.parents):
        # the process would be left in a deleted directory, as would a shell that ran it
        raise ValueError(f"{dest} is (or holds) the working directory; it cannot be replaced from inside")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    old = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        _fsync_tree(tmp)
        if dest.exists() and _exchange(tmp, dest):
            old = tmp  # now the previous version
        else:
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.rename(dest, old)
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        if old is not tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old is not tmp and not dest.exists():
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def trim_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Drop the rows of a metrics JSONL logged after step ``last_step`` (and a cut-off last line), so
    a run resumed from that step's checkpoint does not log those steps twice.  Rows without a
    "step" (the config) stay."""

    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a crash cut off
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step):
            kept.append(line + b"\n")
    atomic_write_bytes(path, b"".join(kept))


class JsonlLog:
    """Append-only JSONL metrics, flushed per line so a crash loses at most the line being written.

    Strict JSON like the reports: a NaN metric (the NDCG of a query with no relevant product, a
    diverged loss) is written as null, which pandas reads back as NaN and jq parses.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        import time

        row = _finite({"event": event, "time": round(time.time(), 3), **fields})
        self.f.write(json.dumps(row, allow_nan=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

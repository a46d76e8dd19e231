"""Whether a run may add to, or reuse, what an earlier run wrote: one rule for its settings.

Three outputs are continued rather than rewritten: a summaries file (`relsum summarize` appends the
products it has not done), a summarizer checkpoint (a resumed `relsum train`) and a finished
cross-validation fold (reused by `train-ranker --folds`).  Each was written with settings, and
continuing it under other settings would mix two runs in one output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Collection, Mapping
from pathlib import Path


def dataclass_defaults(cls) -> dict:
    """A config dataclass's field defaults (a default factory called once)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def changed_settings(saved: Mapping, now: Mapping, *, defaults: Mapping | None = None,
                     ignore: Collection[str] = ()) -> dict[str, tuple]:
    """{setting: (saved value, new value)} for each setting of ``now`` that differs from ``saved``.

    A setting ``saved`` lacks was added after it was written, so the older run had its default:
    it compares against ``defaults`` (None where that has none).  ``ignore``: settings that bound or
    watch a run without changing what it writes (the output folder, the step limit, progress bars).
    """
    defaults = defaults or {}
    return {key: (saved.get(key, defaults.get(key)), value) for key, value in now.items()
            if key not in ignore and saved.get(key, defaults.get(key)) != value}


def describe(changed: Mapping[str, tuple]) -> str:
    """"budget 32 -> 16, task 'summary' -> 'doc2query'": for the error that refuses the run."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# (resolved path, inode, bytes, mtime_ns, ctime_ns) -> sha256: a process checks the same weights more
# than once (each cross-validation fold), and hashing a policy takes ~0.4 s.  The ctime moves on every
# write and on every time reset, so no rewrite keeps its key.
_HASHES: dict[tuple, str] = {}


def weight_files(folder: str | os.PathLike | None) -> list | None:
    """[name, bytes, mtime_ns, sha256] of a model folder's weight files (None for None: a packaged
    default); compare two with :func:`weights_differ`.

    Why: a training run rewrites its checkpoint folder in place, and what was made from the old
    weights (summaries, a summarizer trained against a ranker) must not be continued with the new.
    The content decides, so a plain copy of the folder (new file times) is the same model."""
    if folder is None:
        return None
    files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in Path(folder).glob(pattern))
    out = []
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _HASHES:
            _HASHES[key] = file_sha256(f)
        out.append([f.name, st.st_size, st.st_mtime_ns, _HASHES[key]])
    return out


def weights_differ(saved, now: list | None) -> bool:
    """Whether the weight files a record holds are not ``now``'s (:func:`weight_files`): by name, size
    and content; a record from before the content was recorded ([name, bytes, mtime_ns]) by time."""
    if saved is None or now is None:
        return saved != now
    if not (isinstance(saved, list) and all(isinstance(e, list) and len(e) in (3, 4) for e in saved)):
        return True  # not a record this code wrote
    if any(len(e) == 3 for e in saved):
        return saved != [e[:3] for e in now]
    return [[e[0], e[1], e[3]] for e in saved] != [[e[0], e[1], e[3]] for e in now]

"""Whether a run may add to, or reuse, what an earlier run wrote: one rule for its settings.

Three outputs are continued rather than rewritten: a summaries file (`relsum summarize` appends the
products it has not done), a summarizer checkpoint (a resumed `relsum train`) and a finished
cross-validation fold (reused by `train-ranker --folds`).  Each was written with settings, and
continuing it under other settings would mix two runs in one output.
"""

from __future__ import annotations

import dataclasses
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


def weight_files(folder: str | os.PathLike | None) -> list | None:
    """[name, bytes, mtime_ns] of a model folder's weight files (None for None: a packaged default).

    Why: a training run rewrites its checkpoint folder in place, and what was made from the old
    weights (summaries, a summarizer trained against a ranker) must not be continued with the new."""
    if folder is None:
        return None
    files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in Path(folder).glob(pattern))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]

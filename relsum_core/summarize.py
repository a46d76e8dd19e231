"""Summaries for a whole catalog (``relsum summarize``): JSONL out, resumable, sharded.

Each output line is ``{"product_id", "title", "summary", "tokens"}`` (or ``"skipped"`` with the
reason for a product with no text).  With ``task="doc2query"`` the "summary" holds generated search
queries instead (the Doc2Query baseline), and each line says ``"task": "doc2query"``.

Products are taken in id order and shard ``k`` of ``n`` takes every n-th one, so shards partition
the catalog; ``n`` and ``k`` default to torchrun's ``WORLD_SIZE``/``RANK``.  A rerun reads what the
file already holds and summarises only the rest; a line cut short by a crash is dropped first, so
nothing written is lost or duplicated.  ``<out>.settings.json`` records what wrote the file (policy,
task, budgets, sampling): a rerun with other settings is refused rather than appended to it.  Each
product samples with its own seed (``seed`` + its index in the catalog's id order), so in fp32 a
resumed or sharded run writes what one uninterrupted run would.  In bf16 (what ``precision="auto"``
picks on CPUs with bf16 dot products) it may not: bf16 rounding depends on the shape of the batch a
prompt shares, its rows as well as its left padding (greedy SmolLM2, 8 products: batches of 4
gave 2 of 8 summaries other than one batch of 8, and still 4 of 8 with every prompt padded to the
batch of 8's length, so a fixed padding alone would not fix it).  ``--precision fp32`` when the
files must match.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

import torch

from relsum_core.data import catalog_digest, load_catalog
from relsum_core.io import atomic_write_text, read_json_object
from relsum_core.policy import (
    PROMPTS,
    SUMMARY_BUDGET,
    SUMMARY_PRODUCT_TOKENS,
    NoProductText,
    build_prompt,
    load_policy,
    require_model_folder,
    sample,
)
from relsum_core.precision import resolve_device, resolve_precision
from relsum_core.records import changed_settings, describe, weight_files, weights_differ


def shard_path(out: str | os.PathLike, shard: int, num_shards: int) -> Path:
    out = Path(out)
    if num_shards == 1:
        return out
    return out.with_name(f"{out.stem}.shard{shard:03d}-of-{num_shards:03d}{out.suffix}")


def summary_files(path: str | Path) -> list[Path]:
    """``path``, or where it is missing, the complete set of shard files ``relsum summarize`` wrote
    for it (``<stem>.shardKKK-of-NNN<suffix>``, as sharded or torchrun runs name them)."""
    path = Path(path)
    if path.is_file():
        return [path]
    # exactly shard_path's names: a glob's `*` also took another file's shards (`s.shardtest.shard...`)
    name = re.compile(rf"{re.escape(path.stem)}\.shard\d+-of-(\d+){re.escape(path.suffix)}")
    counts = {int(m.group(1)) for f in path.parent.glob(f"{glob.escape(path.stem)}.shard*")
              if (m := name.fullmatch(f.name))}
    if len(counts) == 1:
        n = counts.pop()
        shards = [shard_path(path, k, n) for k in range(n)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"summaries file {path} does not exist, and of its {n} shards "
                                    f"{len(missing)} are missing, e.g. {missing[:3]}")
        return shards
    if counts:
        raise FileNotFoundError(f"summaries file {path} does not exist, and its shard files come from runs "
                                f"of {sorted(counts)} shards: keep one set")
    raise FileNotFoundError(f"summaries file {path} does not exist")


def _done_ids(path: Path) -> set[str]:
    """Product ids already in ``path``, after cutting off a trailing partial line (every whole line
    is checked first: a file that is not a summaries file is refused, never cut)."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    done = set()
    # Split on b"\n" only: str.splitlines() also breaks at U+2028/U+2029/U+0085, which
    # json.dumps(ensure_ascii=False) leaves raw inside strings (product text does hold them).
    for i, line in enumerate(data[:end].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("product_id"), str)
                and ("summary" in row or "skipped" in row)):
            raise ValueError(f"{path}:{i}: not a summaries row (a JSON object with a product_id and a "
                             "summary or skipped); is --out another file?")
        done.add(row["product_id"])
    if end < len(data):  # the last write was interrupted
        with open(path, "r+b") as f:
            f.truncate(end)
    return done


def _check_settings(path: Path, settings: dict) -> None:
    """Refuse to add to a file that other settings wrote; record them for a new file."""
    record = path.with_name(path.name + ".settings.json")
    if path.exists() and path.stat().st_size == 0:
        path.unlink()  # nothing written yet (an empty shard): any settings may start it
    if path.exists() and not record.exists():
        raise ValueError(f"{path} holds lines but no {record.name}, so what wrote them is unknown (merged "
                         "shards, or another file given as --out?); write to a new file, or delete it")
    if record.exists():
        try:
            saved = read_json_object(record)
        except ValueError as e:
            raise ValueError(f"{e}; delete it (and {path.name}) to start again") from None
        # Path and content both count: the policy folder's prompt (its chat template, its recorded
        # budgets) is not in the weights, and evaluate reads the recorded path.  A record from before
        # the weights or the catalog's digest were recorded does not compare those (the record is
        # written only with a new file, so such a file never gains the check).
        changed = changed_settings(saved, settings, defaults={
            k: settings.get(k) for k in ("policy_weights", "catalog_digest")})
        if "policy_weights" in changed and not weights_differ(*changed["policy_weights"]):
            del changed["policy_weights"]  # the same content under new file times (a copy put back)
        if "policy_weights" in changed and "policy" not in changed and path.exists():
            raise ValueError(f"{path} was written by the policy at {settings['policy']} before its weights "
                             "changed (a training run rewrote them?); write to a new file or delete it to "
                             "summarise with the new weights")
        if "catalog_digest" in changed and "catalog" not in changed and path.exists():
            raise ValueError(f"{path} was written from the catalog at {settings['catalog']} before its "
                             "product ids or texts changed (edited since?); write to a new file or delete "
                             "it to start again")
        if changed and path.exists():
            raise ValueError(f"{path} was written with other settings ({describe(changed)}); write to a new "
                             "file or delete it to start again")
    if not path.exists() or not record.exists():
        atomic_write_text(record, json.dumps(settings, indent=2) + "\n")


def summarize_catalog(out: str | os.PathLike, *, policy: str | None = None, catalog: str | None = None,
                      budget: int = SUMMARY_BUDGET, batch_size: int = 16, temperature: float = 0.0,
                      seed: int = 0, max_product_tokens: int = SUMMARY_PRODUCT_TOKENS, product_ids=None,
                      shard: int | None = None, num_shards: int | None = None, device=None,
                      progress: bool = True, task: str = "summary", precision: str = "auto",
                      max_products: int | None = None) -> Path:
    """Summarise the catalog (or only ``product_ids`` of it; only the first ``max_products`` of
    those in id order) into ``out``; returns the file written.

    ``precision`` "auto" samples in bf16 on CPUs with bf16 dot products (1.6x faster there; the
    prompt's prefill is most of the work) and in fp32 elsewhere, GPUs included, where bf16 sampling
    has not been measured yet.
    """
    from tqdm.auto import tqdm

    num_shards = int(os.environ.get("WORLD_SIZE", 1)) if num_shards is None else num_shards
    shard = int(os.environ.get("RANK", 0)) if shard is None else shard
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard {shard} of {num_shards}")
    if budget <= 0:
        raise ValueError(f"summary budget must be > 0 tokens, got {budget}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_product_tokens < 1:
        raise ValueError(f"max_product_tokens must be >= 1, got {max_product_tokens}")
    if max_products is not None and max_products < 1:
        raise ValueError(f"max_products must be >= 1, got {max_products}")
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(PROMPTS)}")
    local = int(os.environ.get("LOCAL_RANK", -1))
    if device is None and torch.cuda.is_available() and 0 <= local < torch.cuda.device_count():
        # torchrun: one GPU a process, as in training (a launcher that gives each process its own
        # CUDA_VISIBLE_DEVICES leaves one device: then plain "cuda")
        device = f"cuda:{local}"
    device = resolve_device(device)  # like training: CUDA when available
    dtype = resolve_precision(precision, device, auto_on_cuda=False)
    if policy is not None:
        require_model_folder(policy)  # before the settings record: a typo must leave no file behind
    products = load_catalog(catalog)
    catalog_order = sorted(products)
    wanted = catalog_order
    if product_ids is not None:
        wanted = sorted(set(product_ids))
        unknown = [p for p in wanted if p not in products]
        if unknown:
            raise ValueError(f"{len(unknown)} product ids are not in the catalog, e.g. {unknown[:3]}")
    mine = wanted[:max_products][shard::num_shards]
    index = {pid: i for i, pid in enumerate(catalog_order)}  # a product's seed: where it sits
    path = shard_path(out, shard, num_shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    # what the command asked for (precision, not the dtype "auto" chose on this machine; no seed
    # when greedy), so the same command resumes anywhere
    _check_settings(path, {
        "policy": str(Path(policy).resolve()) if policy is not None else "default",
        "policy_weights": weight_files(policy),
        "catalog": str(Path(catalog).resolve()) if catalog is not None else "bundled",
        "catalog_digest": catalog_digest(products),  # its texts: edited in place, it is another catalog
        "task": task, "budget": budget, "max_product_tokens": max_product_tokens,
        "temperature": temperature, "seed": seed if temperature > 0 else None, "precision": precision,
    })
    done = _done_ids(path)  # after the settings check: a refused run leaves the file as it was
    todo = [pid for pid in mine if pid not in done]
    if not todo:
        path.touch()  # a shard with no products still has its (empty) file, as the caller is told
        return path
    model, tok = load_policy(policy, device=device, dtype=dtype)
    desc = f"summarize ({str(dtype).removeprefix('torch.')})"  # which precision --precision auto chose
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(mine), initial=len(mine) - len(todo),
                                                       disable=not progress, desc=desc) as bar:
        for start in range(0, len(todo), batch_size):
            batch, prompts, lines = [], [], []
            for pid in todo[start: start + batch_size]:
                try:
                    prompts.append(build_prompt(products[pid], tok, budget=budget,
                                                max_product_tokens=max_product_tokens, task=task))
                    batch.append(pid)
                except NoProductText as e:  # record it, never retry it
                    lines.append({"product_id": pid, "title": products[pid].title, "skipped": str(e)})
            if prompts:
                r = sample(model, tok, prompts, max_new_tokens=budget, temperature=temperature,
                           seed=[seed + index[pid] for pid in batch])
                tag = {} if task == "summary" else {"task": task}
                lines += [{"product_id": pid, "title": products[pid].title, "summary": text, "tokens": int(n),
                           **tag} for pid, text, n in zip(batch, r.texts, r.lengths.tolist())]
            f.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(lines))
    return path

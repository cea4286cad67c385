"""Run folders: what every run writes beside its results, the lock that keeps two runs out of one
folder, and the fingerprints that keep ``--resume`` from mixing results of different settings.

Guarantees (also stated in the README):

* **Lock.** A run holds ``.trimix.lock`` (process id, host, start time) in its output folder for its
  whole life. A second run into the same folder is refused with the holder named. A lock left by a
  process that no longer exists (a kill, a crash) is taken over with a warning.
* **Empty means empty.** A folder holding only run metadata (``config.yaml``, ``run.json``, the lock)
  is treated as empty: a run that failed before producing results can simply be started again.
* **Metadata never lies.** ``config.yaml`` describes the results beside it: a fresh run writes it; a
  resumed run that passed the fingerprint checks leaves it and records its own invocation in
  ``run.json``'s ``resumed`` list. Metadata is written atomically (temporary file, then rename).
* **Fingerprints.** Each unit of results (an evaluation cell, a CPT run, a generation run) records a
  fingerprint of everything that determines it; ``--resume`` continues only matching units and names
  what changed otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from trimix.errors import ConfigError
from trimix.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

LOCK = ".trimix.lock"
METADATA = ("config.yaml", "run.json", LOCK)


def git_hash() -> str | None:
    """The commit of the trimix checkout, when it runs from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def fingerprint(description: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description (keys sorted)."""
    text = json.dumps(description, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# Settings added to run descriptions after fingerprints were introduced, each with the value that does
# what runs from before it existed did. A description recorded without the field still matches one that
# has it at this value (any other value is a change), so upgrading trimix does not make finished work
# look changed. Add a field here when adding one to a config section that descriptions include.
ADDED_FIELDS: dict[str, Any] = {
    "search.average": "tokens",
    # Evaluation decodes with the run's generation section since it was recorded: before, with defaults.
    "decoding": {
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 0,
        "eos_token_ids": None,
        "ignore_eos": False,
    },
}
_ABSENT = "<absent>"


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The fields that differ between two descriptions, as ``path: old -> new`` lines (none: the same
    settings; a field of :data:`ADDED_FIELDS` missing from ``old`` counts as its listed value)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == _ABSENT and f"{prefix}{key}" in ADDED_FIELDS:
            a = ADDED_FIELDS[f"{prefix}{key}"]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += describe_change(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(
                f"{prefix}{key}: {json.dumps(a, ensure_ascii=False, default=str)} -> "
                f"{json.dumps(b, ensure_ascii=False, default=str)}"
            )
    return changes


def _check_parents(folder: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == folder else f"is inside {str(parent)!r}, which is a file"
                raise ConfigError(f"output dir {str(folder)!r} {where}; choose a folder")
            return


def has_results(folder: Path) -> bool:
    """Whether a folder holds anything besides run metadata."""
    return folder.is_dir() and any(p.name not in METADATA for p in folder.iterdir())


def prepare_output_dir(
    path: str | Path, overwrite: bool = False, resume: bool = False, progress_files: Sequence[str] = ()
) -> Path:
    """Create an output folder; refuse one with results unless ``overwrite`` or ``resume``.

    Deletes nothing: the files a run resumes from are removed by :func:`locked_output_dir` once the
    folder's lock is held (another run may be writing them until then).
    """
    folder = Path(path).expanduser()
    _check_parents(folder)
    if overwrite and resume:
        raise ConfigError("pass either --overwrite (start afresh) or --resume (continue), not both")
    if has_results(folder) and not (overwrite or resume):
        raise ConfigError(
            f"output dir {str(folder)!r} is not empty; pass --overwrite to replace its files"
            + (" or --resume to continue it" if progress_files else "")
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output dir {str(folder)!r}: {exc.strerror}") from exc
    return folder


@contextlib.contextmanager
def locked_output_dir(
    path: str | Path, overwrite: bool = False, resume: bool = False, progress_files: Sequence[str] = ()
) -> Iterator[Path]:
    """:func:`prepare_output_dir`, then hold the folder's lock; only then, with ``overwrite``, delete the
    ``progress_files`` a run resumes from (a predictions file, cached selections), so the run starts
    afresh instead of silently continuing the previous one. A folder another run holds is refused before
    anything in it is touched."""
    folder = prepare_output_dir(path, overwrite=overwrite, resume=resume, progress_files=progress_files)
    with folder_lock(folder):
        stale = [folder / name for name in progress_files] if overwrite else []
        for item in filter(Path.exists, stale):
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
            logger.info("--overwrite: removed %s", item)
        yield folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.trimix.lock`` for the duration: refuse a folder another live run holds, take over
    a lock whose process is gone (with a warning), release it on exit (also after an error)."""
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if holder and same_host and holder.get("pid") and _alive(int(holder["pid"])):
                raise ConfigError(
                    f"output dir {str(folder)!r} is in use by another trimix run (process {holder['pid']} on "
                    f"{holder['host']}, since {holder.get('since')}); wait for it to finish or choose another "
                    "--output-dir"
                ) from None
            if holder and not same_host:
                raise ConfigError(
                    f"output dir {str(folder)!r} is locked by a run on host {holder.get('host')} (process "
                    f"{holder.get('pid')}); if that run is gone, delete {path} and try again"
                ) from None
            logger.warning(
                "taking over the lock of %s left by process %s, which no longer runs",
                folder,
                holder.get("pid"),
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            current = json.loads(path.read_text(encoding="utf-8"))
            if current.get("pid") == me["pid"]:
                path.unlink()


def write_run_info(
    folder: Path,
    config: BaseModel | dict[str, Any] | None,
    seed: int | None,
    resumed: bool = False,
    **extra: Any,
) -> None:
    """Write ``config.yaml`` (the resolved config) and ``run.json`` (versions, git hash, seed, command).

    A resumed run keeps the ``config.yaml`` its results were produced with and appends its own
    invocation (and config, when it differs only in ways the fingerprints allow) to ``run.json``'s
    ``resumed`` list.
    """
    import torch
    import transformers

    from trimix import __version__

    data = None
    if config is not None:
        data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
        logger.info("resolved config:\n%s", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    info = {
        "trimix": __version__,
        "git": git_hash(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": seed,
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    run_json = folder / "run.json"
    if resumed and run_json.is_file():
        previous = json.loads(run_json.read_text(encoding="utf-8"))
        previous.setdefault("resumed", []).append({**info, "config": data})
        atomic_write_json(run_json, previous)
        return
    if data is not None:
        atomic_write_text(folder / "config.yaml", yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    atomic_write_json(run_json, info)


def read_run_json(folder: Path) -> dict[str, Any] | None:
    path = folder / "run.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None

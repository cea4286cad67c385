"""What every run writes beside its results: the resolved config, versions, git hash and seed."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from trimix.errors import ConfigError

logger = logging.getLogger(__name__)


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


def prepare_output_dir(
    path: str | Path, overwrite: bool = False, resume: bool = False, progress_files: Sequence[str] = ()
) -> Path:
    """Create an output folder; refuse a non-empty one unless ``overwrite`` or ``resume``.

    ``progress_files`` name what a run resumes from (a predictions file, cached selections): with
    ``overwrite`` and without ``resume`` they are deleted, so the run starts afresh instead of
    silently continuing the previous one. Nothing else in the folder is touched.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output dir {str(folder)!r} is a file; choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (overwrite or resume):
        raise ConfigError(
            f"output dir {str(folder)!r} is not empty; pass --overwrite to replace its files"
            + (" or --resume to continue it" if progress_files else "")
        )
    stale = [folder / name for name in progress_files] if overwrite and not resume else []
    for path in filter(Path.exists, stale):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        logger.info("--overwrite: removed %s", path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_run_info(
    folder: Path, config: BaseModel | dict[str, Any] | None, seed: int | None, **extra: Any
) -> None:
    """Write ``config.yaml`` (the resolved config) and ``run.json`` (versions, git hash, seed, command)."""
    import torch
    import transformers

    from trimix import __version__

    if config is not None:
        data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
        (folder / "config.yaml").write_text(
            yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8"
        )
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
    (folder / "run.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

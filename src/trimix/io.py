"""Reading and writing files with messages that name the file, and writes that are never half-done.

Everything a user hands trimix as a file (configs, prompts, corpora, task data) is read through
:func:`read_text`, so a missing file, a binary file or a file that is not UTF-8 fails with the path and
what to do, never with a decoder traceback. Results and metadata are written with :func:`atomic_write_text`
(a temporary file renamed into place), so an interruption leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from trimix.errors import DataError, TrimixError


class DiskFullError(TrimixError):
    """The disk (or quota) is full; what was written before is intact and the run can be resumed."""


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark, which some editors write, is dropped).

    Raises:
        DataError: the file is missing, a folder, binary, or not UTF-8 (path and byte offset named).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} {str(path)!r} does not exist")
    if not (path.is_file() or path.is_fifo() or path.is_char_device()):  # pipes and /dev/stdin read too
        raise DataError(f"{what} {str(path)!r} is not a file")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{what} {str(path)!r} is not a text file (it contains NUL bytes)")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{what} {str(path)!r} is not UTF-8 text (invalid byte at offset {exc.start}); convert it, "
            f"e.g. `iconv -f YOUR_ENCODING -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from exc


def decode_stdin(raw: bytes) -> str:
    """Text piped on standard input, as UTF-8 (a clear error otherwise)."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise DataError(f"standard input is not UTF-8 text (invalid byte at offset {exc.start})") from exc


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents of a ``.txt`` file (one per line) or ``.jsonl`` file (``text_field`` of each object).

    Raises:
        DataError: a missing or non-text file, bad JSON, or a missing field (file and line named).
    """
    path = Path(path).expanduser()
    text = read_text(path, "corpus file")
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            docs.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{number}: no string field {text_field!r}; set `cpt.text_field` to the text key"
            )
        if value.strip():
            docs.append(value.strip())
    return docs


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed into place."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with staging.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise disk_error(exc, path) from exc


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def disk_error(exc: OSError, path: str | Path) -> OSError | TrimixError:
    """A clear error for a full disk; any other OS error unchanged."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"no space left on the device while writing {path}; everything written before is intact. "
            "Free some space and run the same command with --resume"
        )
    return exc


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error a user can cause: what failed, on which file, what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device{where}; free some space and run the same command with --resume"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where}: {exc.strerror}; choose a folder you can write to (-o)"
    return f"{exc.strerror or exc}{where}"


def read_jsonl(path: str | Path, repair: bool = True) -> list[dict[str, Any]]:
    """The rows of a JSON-lines results file.

    Only the last line may be incomplete (a run killed while writing it): it is dropped with a warning
    and, with ``repair``, cut from the file so appending can continue after it. A damaged line anywhere
    else is an error naming the file and line; nothing is removed.

    Raises:
        DataError: a line before the last that is not a complete JSON object.
    """
    import logging

    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    chunks = raw.splitlines(keepends=True)
    rows, good_bytes = [], 0
    for number, chunk in enumerate(chunks, start=1):
        last = number == len(chunks)
        if last and not chunk.endswith(b"\n"):
            break  # the last line, cut short
        try:
            rows.append(json.loads(chunk))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if last:
                break
            raise DataError(
                f"{path}:{number}: not a complete JSON line ({exc.__class__.__name__}); the file is damaged "
                "before its end, so it was left as it is. Repair or remove that line, then run again"
            ) from exc
        good_bytes += len(chunk)
    if good_bytes < len(raw):
        logging.getLogger(__name__).warning(
            "%s: dropping an incomplete last line (the run writing it was interrupted)", path
        )
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(good_bytes)
    return rows


class JsonlSink:
    """Appends JSON lines, each batch made durable (fsync) before the next starts.

    Args:
        path: the results file (created if missing).
        fault: a :mod:`trimix.faults` point name; when it fires, half a line is written and the process
            'dies' (:class:`~trimix.faults.SimulatedKill`), as a kill in the middle of a write would.
    """

    def __init__(self, path: str | Path, fault: str | None = None) -> None:
        self.path = Path(path)
        self.fault = fault
        self.failed = False
        try:
            self.handle = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise disk_error(exc, self.path) from exc

    def write(self, rows: list[dict[str, Any]]) -> None:
        from trimix.faults import SimulatedKill, fault_point

        try:
            for row in rows:
                line = json.dumps(row, ensure_ascii=False) + "\n"
                if self.fault and fault_point(self.fault):
                    self.handle.write(line[: len(line) // 2])
                    self.handle.flush()
                    raise SimulatedKill(f"fault injected at {self.fault}")
                self.handle.write(line)
            self.handle.flush()
            os.fsync(self.handle.fileno())
        except OSError as exc:
            self.failed = True
            raise disk_error(exc, self.path) from exc

    def close(self) -> None:
        """Close the file; after a failed write the error already raised is the one that counts (closing
        flushes the same unwritable bytes again)."""
        try:
            self.handle.close()
        except OSError as exc:
            if not self.failed:
                raise disk_error(exc, self.path) from exc

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file's contents atomically (e.g. to drop the rows of cells that will be redone)."""
        self.handle.close()
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.handle = self.path.open("a", encoding="utf-8")

"""Atomic file output and prompt-file loading.

Every file the toolkit writes goes to a temporary name in the same folder first and is
then renamed, so an interrupted run never leaves a half-written table behind.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from bganalysis.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:  # an interrupt at any point below, even right after mkstemp, leaves no temporary file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def atomic_write_parquet(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as Parquet through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path` and rename it to `path` on success.

    An existing folder at `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):
        if file.is_file() and not file.stat().st_mode & 0o044:
            os.chmod(file, 0o666 & ~_umask())  # some writers (safetensors) create files as 0600
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def drop_cut_off_line(path: str | os.PathLike) -> bytes:
    """Return the bytes of the append-only JSONL file `path` after removing a cut-off last line from it.

    A file appended to line by line ends with a newline unless a write was cut off (a
    kill, a full disk). The bytes after the last newline are removed atomically, with a
    warning, so the next append starts on a line of its own.
    """
    data = Path(path).read_bytes()
    tail = data[data.rfind(b"\n") + 1:]
    if tail:
        logging.getLogger(__name__).warning(
            "%s: dropping a cut-off last line (%d bytes without a newline); it will be redone", path, len(tail))
        data = data[: len(data) - len(tail)]
        atomic_write_bytes(path, data)
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_prompts_file(path: str | os.PathLike) -> Path:
    """Return `path` as a Path, or raise UserError when no such file exists."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}; pass a JSONL file with one {{\"prompt\": ...}} object a line")
    return path


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Read prompts as a list of `{"id", "prompt", "response"?}` rows.

    Accepted: JSONL with a `prompt` field and an optional `response` (plain or .gz), and
    benchmark files that carry a `prompt` field under another id key (HumanEval's
    `task_id`). Raises UserError naming the file and line for anything malformed.
    """
    path = check_prompts_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict] = []
    first_line_of: dict[str, int] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = _parse_prompt_line(path, number, line)
                key = (row["id"], row["sample"])  # `bganalysis generate` writes one row per sample
                if key in first_line_of:
                    raise UserError(f"{path}:{number}: duplicate id {row['id']!r} (first on line "
                                    f"{first_line_of[key]}); give every prompt a unique \"id\"")
                first_line_of[key] = number
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start}); re-encode the file as UTF-8") from None
    except (OSError, EOFError) as error:
        raise UserError(f"{path}: cannot read ({error}); check the file is a readable JSONL or .jsonl.gz file") from None
    if not rows:
        raise UserError(f"{path}: no prompts found (the file is empty); add one {{\"prompt\": ...}} object a line")
    return rows


def _parse_prompt_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{number}: malformed JSON ({error.msg}); fix the line so that it is one JSON object "
                        "such as {\"prompt\": \"...\"}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}; "
                        "fix the line so that it is one object such as {\"prompt\": \"...\"}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f"{path}:{number}: missing the string field \"prompt\"; add one, as in {{\"prompt\": \"...\"}}")
    response = record.get("response")
    if response is not None and not isinstance(response, str):
        raise UserError(f"{path}:{number}: field \"response\" must be a string, found {type(response).__name__}; "
                        "make it a string or remove it")
    doc_id = record.get("id", record.get("task_id", f"line{number}"))
    return {"id": str(doc_id), "prompt": prompt, "response": response, "sample": record.get("sample")}

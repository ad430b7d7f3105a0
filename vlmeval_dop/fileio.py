"""Files that survive crashes, full disks and concurrent writers; parse errors that name the file.

- `atomic_write_text`: a temporary file in the target's folder, flushed and fsynced, then renamed over the
  target, so readers see the old content or the new one, never a half-written file. Files are created
  0644 (world-readable, as the rest of eval_configs; `tempfile.mkstemp` alone would make them 0600).
- `locked`: an exclusive `fcntl.flock` on a folder, held for a read-merge-write cycle, so concurrent
  writers (e.g. several `vlmeval-dop solve --install` into one tag) serialise instead of losing updates.
- `RecordFile`: an append-only JSON-lines file of finished work items. Each record is one `os.write`
  of a complete line; a write that fails (ENOSPC, EDQUOT, ...) is undone by truncating the file back to
  its previous length, and a line torn by a kill (no newline, or not valid JSON) is detected on the next
  read: the item it held is simply computed again, and the file is rewritten without it before anything
  is appended.
- `read_json` / `read_yaml`: a parse error names the file, the line and column, and what to do.
- `fingerprint`: a stable hash of JSON-able data (cache keys).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
_os_write = os.write  # indirection: tests simulate a full disk by replacing it


class FileFormatError(ValueError):
    """A JSON/YAML file that cannot be parsed or has the wrong shape; the message names the file and the fix."""


class DiskFullError(OSError):
    """A write failed for lack of space; nothing half-written was left behind."""


def atomic_write_text(path: str | Path, text: str, mode: int = FILE_MODE) -> Path:
    """Replace `path` with `text` atomically (temp file + fsync + rename); the file gets `mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[_write_some(fd, view, tmp):]
        os.fsync(fd)
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _write_some(fd: int, data, name) -> int:
    try:
        return _os_write(fd, data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(exc.errno, os.strerror(exc.errno), str(name)) from exc
        raise


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) for the duration of the block.

    The lock is `flock` on the folder itself, so no lock file is left behind; it is released when the
    process dies, so a killed writer never blocks the next one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------------------------------ parsing
def _where(exc: Exception) -> str:
    line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    mark = getattr(exc, "problem_mark", None)  # yaml
    if mark is not None:
        line, col = mark.line + 1, mark.column + 1
    return f" at line {line} column {col}" if line is not None else ""


def read_json(path: str | Path, fix: str) -> Any:
    """JSON content of `path`; FileFormatError naming the file, the position and `fix` if it does not parse."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path} does not exist; {fix}")
    if not path.is_file():
        raise FileFormatError(f"{path} is not a file; {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = getattr(exc, "msg", None) or str(exc)
        raise FileFormatError(f"{path} is not valid JSON ({msg}{_where(exc)}; truncated?); {fix}") from None


def read_yaml(path: str | Path, fix: str) -> Any:
    """YAML content of `path`; FileFormatError naming the file, the position and `fix` if it does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path} is not UTF-8 text ({exc}); {fix}") from None
    return parse_yaml(text, path, fix)


def parse_yaml(text: str, path: Any, fix: str) -> Any:
    """`yaml.safe_load(text)`; FileFormatError naming `path`, the position and `fix` if it does not parse."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FileFormatError(f"{path} is not valid YAML ({problem}{_where(exc)}); {fix}") from None


# ------------------------------------------------------------------------------------------ records
class RecordFile:
    """An append-only JSON-lines file of records (dicts), safe against torn lines and full disks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> tuple[list[tuple[dict, bytes]], int]:
        """(valid records with their raw line, number of torn/invalid lines dropped)."""
        if not self.path.exists():
            return [], 0
        out, bad = [], 0
        for raw in self.path.read_bytes().splitlines(keepends=True):
            if not raw.strip():
                continue
            record = _parse_record(raw)
            if record is None:
                bad += 1
            else:
                out.append((record, raw))
        return out, bad

    def rewrite(self, raw_lines: list[bytes]) -> None:
        """Atomically replace the file by these complete lines (drops torn and superseded records)."""
        atomic_write_text(self.path, b"".join(raw_lines).decode("utf-8"))

    def append(self, record: dict) -> None:
        """Append one record as a single complete line; on failure the file is left as it was."""
        data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[_write_some(fd, view, self.path):]
            except BaseException:
                os.ftruncate(fd, size)  # no torn line: the record is simply not there
                raise
        finally:
            os.close(fd)


def _parse_record(raw: bytes) -> dict | None:
    if not raw.endswith(b"\n"):  # torn by a kill or a full disk mid-line
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


# ------------------------------------------------------------------------------------------ hashing
def fingerprint(*parts: Any) -> str:
    """sha256 (hex, 20 chars) of JSON-able `parts` in canonical form (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_id(path: str | Path) -> str:
    """An id of a checkpoint folder's content without reading gigabytes.

    Files up to 64 MB are hashed. Larger ones are identified by the name of the blob they link to in a
    Hugging Face cache (the blob name is the file's sha256) or else by size and modification time.
    """
    path = Path(path)
    parts = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):  # lock and temporary files of other writers
            continue
        real = Path(os.path.realpath(f))
        try:
            if not real.is_file():
                continue
            size = real.stat().st_size
            if size <= 64 << 20:
                ident = file_sha256(real)
            elif real.parent.name == "blobs":
                ident = real.name
            else:
                ident = f"{size}:{real.stat().st_mtime_ns}"
        except FileNotFoundError:  # removed while listing: not part of the checkpoint
            continue
        parts.append((str(rel), ident))
    return fingerprint(parts)


def tensor_digest(value: Any) -> str:
    """Content hash of a processor output (tensors by dtype, shape and bytes; other values by repr)."""
    import torch

    h = hashlib.sha256()

    def add(name: str, v: Any) -> None:
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict) or hasattr(v, "items"):
            for k in sorted(v.keys(), key=str):
                add(f"{name}.{k}", v[k])
        else:
            h.update(repr(v).encode())

    add("", value)
    return h.hexdigest()[:20]


def check_writable_dir(path: str | Path, what: str) -> None:
    """ValueError unless `path` is a folder that can be written, or can be created (nothing is created)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what} {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path} cannot be created: {parent} is not writable")

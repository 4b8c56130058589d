"""Files that are never seen half-written: the one place that renames files into place.

Two ways to change a file:
  * whole: `write_bytes_atomic` / `write_json_atomic` / `write_text_atomic`, or
    `atomic_writer` for libraries that write to a file object (np.save, PIL,
    Parquet, matplotlib): a temporary file in the same folder, fsync, rename over
    the target, fsync the folder. Readers see the old file or the new one.
  * in place: `write_at` (overwrite or append at an offset) and `truncate`, each
    fsynced before it returns. Not atomic by themselves; the database's journal
    (db_journal.py) makes a group of them all-or-nothing.

`move_into_place` renames a finished file or folder over another, durably.

Every write goes through os.write, os.fsync, os.ftruncate and os.replace, so a
test can make any one of these calls fail (tests/fault_injection.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from errors import UserError

_BUFFER = 1 << 20


def dumps(data: Any, indent: bool = False) -> bytes:
    """JSON bytes (numpy arrays become lists) the way every file of the project is written."""
    import orjson  # here, not at the top: bench/gpu.py runs on GPU machines without it
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(data, option=option)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON so that readers see the old file or the new one, never half."""
    _user_write(Path(path), dumps(data, indent=True))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) atomically, like write_json_atomic."""
    _user_write(Path(path), text.encode("utf-8"))


def _user_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied") from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes | Iterable[bytes],
                       sync_folder: bool = True, durable: bool = True) -> int:
    """Replace `path` with `data` (bytes, or an iterable of chunks, streamed) atomically.

    Returns the size written. With `sync_folder=False` the caller fsyncs the folder
    itself (`fsync_dir`): the database tells an error of the rename (nothing
    changed) from one after it (the new file is in place). With `durable=False`
    nothing is fsynced (about 10 ms a file saved on an ext4 disk): readers still
    see the old file or the whole new one, but a power cut may lose it. For
    caches that are remade when lost (thumbnails.py).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            size, buffer = 0, bytearray()
            for chunk in ([data] if isinstance(data, bytes) else data):
                buffer += chunk
                if len(buffer) >= _BUFFER:  # few large writes, not one per entry
                    _write_all(fd, buffer)
                    size += len(buffer)
                    buffer.clear()
            _write_all(fd, buffer)
            size += len(buffer)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_folder and durable:
        fsync_dir(path.parent)
    return size


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` when the block ends without
    an error (fsync, rename, folder fsync); on an error `path` is left as it was.

    `suffix` ends the temporary file's name, for writers that pick a format by it
    (matplotlib's savefig, faiss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Like atomic_writer, for writers that take a file name (faiss.write_index): write
    the yielded temporary path; it replaces `path` when the block ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def move_into_place(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a finished file or folder over `target` and fsync the folder."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


def write_at(path: str | os.PathLike, offset: int, data: bytes, end: bool = False) -> int:
    """Write `data` at byte `offset` of an existing file and fsync it; with `end=True`
    the file then ends there (an append that also drops anything an earlier failed
    write left behind). Returns offset + len(data)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        _write_all(fd, data)
        if end:
            os.ftruncate(fd, offset + len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset + len(data)


def append(path: str | os.PathLike, data: bytes) -> None:
    """Append `data` to `path` (created if missing) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate(path: str | os.PathLike, size: int) -> None:
    """Cut `path` to `size` bytes (if it is longer) and fsync it."""
    path = Path(path)
    if not path.exists() or path.stat().st_size <= size:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder `path` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


__all__ = ["dumps", "write_json_atomic", "write_text_atomic", "write_bytes_atomic",
           "atomic_writer", "atomic_path", "move_into_place", "write_at", "append", "truncate",
           "fsync_dir"]

"""Pictures for the web page as files: each written once, whole, and kept in a
bounded cache.

Gradio serves a picture from a file. Given a PIL image it encodes it on every
request and writes it to a path named by its content with a plain write, so two
visitors shown the same picture rewrite the file while a third is downloading it
(Gradio 6.31, processing_utils.save_pil_to_cache). Given a file path it copies
the file under a temporary name and renames it, which is safe. So the page hands
Gradio paths from here:

    cache = ThumbnailCache()
    path = cache.file_for(source_key("flickr", "dog.jpg", "/data/dog.jpg"),
                          lambda: make_thumbnail_somehow())

The first call for a key makes the picture and writes it (temporary name, then
rename); later calls return the same path without decoding or encoding anything.
The cache lives in a folder of its own under the system's temporary directory
(one per process, removed when the process exits), holds at most `max_bytes`,
and forgets the least recently used pictures first. Importing this module does
no work.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from atomic_files import write_bytes_atomic

if TYPE_CHECKING:
    from PIL import Image

MAX_BYTES = 64 * 2**20   # about 4,000 thumbnails of 320 pixels
FORMAT = "webp"          # what Gradio's galleries and images encode PIL images as


def source_key(*parts: object) -> str:
    """A cache key naming a picture by where it comes from (an id, a data set, a
    file). A part that is an existing file also contributes its size and
    modification time, so a file changed in place gets a new picture."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode() + b"\x00")
        if isinstance(part, (str, os.PathLike)) and part:
            try:
                stat = os.stat(part)
            except (OSError, ValueError):
                continue
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}\x00".encode())
    return h.hexdigest()


def pixels_key(image: "Image.Image", *parts: object) -> str:
    """A cache key naming a picture by its pixels (for images that have no file,
    such as an upload), plus any `parts` that change how it is drawn."""
    h = hashlib.sha256(repr((image.mode, image.size, parts)).encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encode(image: "Image.Image", format: str = FORMAT) -> bytes:
    """The picture's file bytes, encoded as Gradio encodes a PIL image
    (processing_utils.encode_pil_to_bytes), so the page shows the same bytes."""
    with io.BytesIO() as out:
        image.save(out, format)
        return out.getvalue()


class ThumbnailCache:
    """Picture files by key, written once each; at most `max_bytes` on disk.

    Thread-safe: concurrent calls for one key make and write the picture once,
    the others wait for it. `folder` defaults to a new folder under the system's
    temporary directory (which Gradio may serve files from), made on first use
    and removed at exit. A path handed out stays on disk until `max_bytes` of
    newer pictures have been made, long after Gradio has copied it into its own
    cache (which it does while preparing the response).
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = MAX_BYTES,
                 format: str = FORMAT):
        self.max_bytes = max_bytes
        self.format = format
        self._folder = Path(folder) if folder is not None else None
        self._files: OrderedDict[str, tuple[Path, int]] = OrderedDict()  # least recent first
        self._bytes = 0
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}
        self.made = 0   # pictures made and written (the rest were cache hits)

    @property
    def folder(self) -> Path:
        """Where the files are (made on first use)."""
        with self._lock:
            return self._ensure_folder()

    def _ensure_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="recap-thumbnails-"))
            atexit.register(shutil.rmtree, self._folder, ignore_errors=True)
        else:
            self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    @property
    def size_bytes(self) -> int:
        """Bytes of the pictures cached now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    def file_for(self, key: str, make: Callable[[], "Image.Image"]) -> str:
        """The path of the picture for `key`; `make()` draws it on the first call
        (an exception from it propagates, and nothing is cached)."""
        found = self._hit(key)
        if found is not None:
            return found
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        with making:
            found = self._hit(key)    # made by another thread while this one waited
            if found is not None:
                return found
            try:
                data = encode(make(), self.format)
                with self._lock:
                    folder = self._ensure_folder()
                path = folder / f"{key[:40]}.{self.format}"
                # whole or not at all for a reader; no fsync: the cache dies with the process
                write_bytes_atomic(path, data, durable=False)
                with self._lock:
                    self._files[key] = (path, len(data))
                    self._bytes += len(data)
                    self.made += 1
                    self._evict()
            finally:
                with self._lock:
                    self._making.pop(key, None)
        return str(path)

    def _hit(self, key: str) -> str | None:
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return None
            if not entry[0].exists():         # removed behind our back: make it again
                self._forget(key)
                return None
            self._files.move_to_end(key)
            return str(entry[0])

    def _evict(self) -> None:
        """Forget the least recently used pictures until the cache fits (always
        keeping the newest, which a response is about to hand out)."""
        while self._bytes > self.max_bytes and len(self._files) > 1:
            self._forget(next(iter(self._files)))

    def _forget(self, key: str) -> None:
        path, size = self._files.pop(key)
        self._bytes -= size
        path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every cached picture."""
        with self._lock:
            for key in list(self._files):
                self._forget(key)

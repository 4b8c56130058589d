"""thumbnails.py: picture files for the web page, written once, whole, in a bounded cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from fake_flickr import make_image
from thumbnails import ThumbnailCache, encode, pixels_key, source_key

ROOT = Path(__file__).resolve().parent.parent


def test_a_picture_is_made_once_and_written_whole(tmp_path):
    cache = ThumbnailCache(tmp_path / "pictures")
    picture = make_image(1, (200, 150))
    calls = []

    def make():
        calls.append(1)
        return picture
    path = cache.file_for("dog", make)
    assert cache.file_for("dog", make) == path and len(calls) == 1 and cache.made == 1
    assert Path(path).parent == tmp_path / "pictures" and path.endswith(".webp")
    assert Path(path).read_bytes() == encode(picture)
    assert Image.open(path).size == (200, 150)
    assert os.listdir(tmp_path / "pictures") == [Path(path).name]   # no temporary file left


def test_concurrent_calls_for_one_picture_make_it_once(tmp_path):
    cache = ThumbnailCache(tmp_path)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return make_image(2)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cache.file_for("cat", slow)))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and len(paths) == 16


def test_the_cache_is_bounded_and_forgets_the_least_recently_used_first(tmp_path):
    pictures = {n: make_image(n, (120, 90)) for n in range(6)}
    size = {n: len(encode(picture)) for n, picture in pictures.items()}
    cache = ThumbnailCache(tmp_path, max_bytes=size[0] + size[2] + size[3] + size[4])  # 4 fit
    paths = {n: cache.file_for(str(n), lambda n=n: pictures[n]) for n in range(3)}
    cache.file_for("0", lambda: pictures[0])       # 0 was used again: 1 is now the oldest
    paths[3] = cache.file_for("3", lambda: pictures[3])
    paths[4] = cache.file_for("4", lambda: pictures[4])
    assert cache.size_bytes <= cache.max_bytes and len(cache) == 4
    assert not Path(paths[1]).exists()              # forgotten, and its file removed
    assert all(Path(paths[n]).exists() for n in (0, 2, 3, 4))
    assert len(list(tmp_path.iterdir())) == len(cache)
    made = cache.made
    cache.file_for("1", lambda: pictures[1])        # asked again: drawn again
    assert cache.made == made + 1
    cache.clear()
    assert list(tmp_path.iterdir()) == [] and cache.size_bytes == 0


def test_a_picture_that_cannot_be_drawn_is_not_cached(tmp_path):
    cache = ThumbnailCache(tmp_path)

    def broken():
        raise OSError("truncated file")
    with pytest.raises(OSError, match="truncated file"):
        cache.file_for("bad", broken)
    assert len(cache) == 0 and list(tmp_path.iterdir()) == []
    assert Path(cache.file_for("bad", lambda: make_image(3))).exists()   # the file came back


def test_a_picture_removed_from_disk_is_drawn_again(tmp_path):
    cache = ThumbnailCache(tmp_path)
    path = cache.file_for("dog", lambda: make_image(4))
    Path(path).unlink()
    assert cache.file_for("dog", lambda: make_image(4)) == path and Path(path).exists()
    assert cache.made == 2


def test_keys_follow_the_source_file_and_the_pixels(tmp_path):
    photo = tmp_path / "dog.jpg"
    make_image(5).save(photo)
    key = source_key("flickr", "dog.jpg", str(photo))
    assert source_key("flickr", "dog.jpg", str(photo)) == key
    assert source_key("other-data-set", "dog.jpg", str(photo)) != key
    make_image(6, (100, 70)).save(photo)           # the file replaced in place
    os.utime(photo, ns=(1, 1))
    assert source_key("flickr", "dog.jpg", str(photo)) != key
    assert source_key("flickr", "dog.jpg", None) == source_key("flickr", "dog.jpg", None)

    a, b = make_image(7), make_image(8)
    assert pixels_key(a, 320) == pixels_key(a.copy(), 320) != pixels_key(b, 320)
    assert pixels_key(a, 320) != pixels_key(a, 160)


def test_the_default_folder_is_temporary_and_removed_at_exit():
    code = ("import thumbnails; from PIL import Image; c = thumbnails.ThumbnailCache(); "
            "print(c.file_for('x', lambda: Image.new('RGB', (8, 8))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip()).parent
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("recap-")
    assert not folder.exists()

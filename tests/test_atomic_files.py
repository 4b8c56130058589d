"""Files that are never seen half-written: whole-file writes (temp + fsync + rename
+ folder fsync), in-place writes and truncation, and what a failure leaves."""

import json
import os

import numpy as np
import pytest

from atomic_files import (append, atomic_path, atomic_writer, move_into_place, truncate,
                          write_at, write_bytes_atomic, write_json_atomic, write_text_atomic)
from errors import UserError


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": np.float32(0.5), "v": np.arange(3, dtype=np.float32)})
    assert json.loads(path.read_text()) == {"a": 0.5, "v": [0.0, 1.0, 2.0]}
    write_json_atomic(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert os.listdir(path.parent) == ["r.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.txt"
    write_text_atomic(path, "old")
    real = os.write

    def disk_full(fd, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError):
        write_text_atomic(path, "new")
    monkeypatch.setattr(os, "write", real)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.txt"]


def test_chunks_are_streamed_and_counted(tmp_path):
    chunks = (bytes([n % 256]) * 300_000 for n in range(10))     # 3 MB in 10 pieces
    size = write_bytes_atomic(tmp_path / "f", chunks)
    data = (tmp_path / "f").read_bytes()
    assert size == len(data) == 3_000_000 and data[::300_000] == bytes(range(10))


def test_atomic_writer_keeps_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "v.npy"
    with atomic_writer(path) as f:
        np.save(f, np.arange(3))
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as f:
            f.write(b"half")
            raise RuntimeError("the library failed")
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    assert os.listdir(tmp_path) == ["v.npy"]


def test_atomic_path_is_for_writers_that_take_a_file_name(tmp_path):
    with atomic_path(tmp_path / "i.faiss", suffix=".faiss") as tmp:
        assert tmp.name.endswith(".faiss") and tmp.parent == tmp_path
        tmp.write_bytes(b"index")
    assert (tmp_path / "i.faiss").read_bytes() == b"index"
    assert os.listdir(tmp_path) == ["i.faiss"]


def test_in_place_writes_appends_and_truncation(tmp_path):
    path = tmp_path / "f"
    append(path, b"hello world")
    assert write_at(path, 6, b"there") == 11 and path.read_bytes() == b"hello there"
    assert write_at(path, 5, b"!", end=True) == 6 and path.read_bytes() == b"hello!"
    truncate(path, 100)                          # never makes a file longer
    truncate(path, 5)
    assert path.read_bytes() == b"hello"


def test_move_into_place_replaces_a_folder(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("x")
    move_into_place(tmp_path / "new", tmp_path / "models")
    assert (tmp_path / "models" / "x").read_text() == "x" and not (tmp_path / "new").exists()


def test_permission_denied_is_a_user_error(tmp_path):
    os.chmod(tmp_path, 0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(UserError, match="permission denied"):
            write_json_atomic(tmp_path / "r.json", {})
    finally:
        os.chmod(tmp_path, 0o755)


def test_no_other_module_renames_files():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for folder, _, names in os.walk(root):
        if any(part.startswith(".") or part == "tests" for part in
               os.path.relpath(folder, root).split(os.sep)):
            continue
        for name in names:
            if name.endswith(".py") and name != "atomic_files.py":
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                if "os.replace(" in text or "os.rename(" in text or ".rename(" in text:
                    offenders.append(os.path.relpath(os.path.join(folder, name), root))
    assert offenders == []

"""Files that are never seen half-written: whole-file writes (temp + fsync + rename
+ folder fsync), in-place writes and truncation, and what a failure leaves."""

import ast
import json
import os
from pathlib import Path

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


def test_a_cache_file_is_written_whole_without_fsync(tmp_path, monkeypatch):
    path = tmp_path / "thumb.webp"
    write_bytes_atomic(path, b"old")
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    assert write_bytes_atomic(path, [b"new ", b"picture"], durable=False) == 11
    assert path.read_bytes() == b"new picture" and synced == []
    assert os.listdir(tmp_path) == ["thumb.webp"]
    write_bytes_atomic(path, b"kept")                   # the default: file and folder fsynced
    assert len(synced) == 2


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


RENAMES = {"os": {"replace", "rename", "renames"}, "shutil": {"move"}}


def renames(source: str) -> list[tuple[int, str]]:
    """(line, call) of each rename in Python `source`: os.replace / os.rename /
    os.renames / shutil.move (called, referenced or imported by name, under any
    alias) and Path.replace / Path.rename (a one-argument .replace(target) or
    .rename(target): str.replace takes two, dataclasses' and settings' keywords)."""
    tree = ast.parse(source)
    modules = {}  # local name -> "os" / "shutil"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name): a.name for a in node.names if a.name in RENAMES}
        elif isinstance(node, ast.ImportFrom) and node.module in RENAMES:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if a.name in RENAMES[node.module]]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.attr in RENAMES.get(modules.get(node.value.id), ())):
            found.append((node.lineno, f"{modules[node.value.id]}.{node.attr}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("replace", "rename")
              and not (isinstance(node.func.value, ast.Name) and node.func.value.id in modules)
              and len(node.args) == 1 and not node.keywords
              and not isinstance(node.args[0], ast.Starred)):
            found.append((node.lineno, f"Path.{node.func.attr}"))
    return sorted(found)


def test_the_rename_finder_finds_every_spelling():
    source = """
import os, shutil as sh
from os import rename as mv
import dataclasses
os.replace(a, b)
sh.move(a, b)
tmp.replace(path)
Path(tmp).rename(path)
swap = os.renames
text.replace("a", "b")
settings.replace(**overrides)
dataclasses.replace(size, longest_edge=2)
os.path.join(a, b)
"""
    assert renames(source) == [(3, "os.rename"), (5, "os.replace"), (6, "shutil.move"),
                               (7, "Path.replace"), (8, "Path.rename"), (9, "os.renames")]


def test_no_other_module_renames_files():
    """atomic_files.py is the one module that renames files into place: every other
    module of the repository (top-level, and each package such as scale/ and bench/)
    writes through it."""
    root = Path(__file__).resolve().parent.parent
    packages = [p for p in sorted(root.iterdir()) if (p / "__init__.py").is_file()
                and p.name != "tests"]
    assert {"scale", "bench"} <= {p.name for p in packages}
    modules = sorted(root.glob("*.py")) + [m for p in packages for m in sorted(p.rglob("*.py"))]
    offenders = [f"{m.relative_to(root)}:{line}: {call}" for m in modules
                 if m.name != "atomic_files.py"
                 for line, call in renames(m.read_text(encoding="utf-8"))]
    assert not offenders, "modules that rename files themselves, not through atomic_files:\n" + "\n".join(offenders)
    assert renames((root / "atomic_files.py").read_text(encoding="utf-8"))  # it does rename

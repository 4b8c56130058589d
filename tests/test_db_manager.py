"""The three databases: seeding, appending, replacing, and refusing bad files."""

import json
import os

import numpy as np
import pytest

from db_manager import (CAPTION_DB, CAPTION_EMBEDDING_DB, FILES, IMAGE_DB, DbIdentity, DbManager,
                        generated_caption_id, write_json_atomic)
from errors import UserError

IDENTITY = DbIdentity(clip_model="clip", caption_model="bge", dataset="flickr", split="abc")


def unit(rows, dim, seed=0):
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def seeded(db_dir, identity=IDENTITY):
    db = DbManager.open(db_dir, identity)
    assert db.needs_seed
    captions = [{"id": f"im{i}.jpg#{n}", "image_id": f"im{i}.jpg", "caption": f"caption {i} {n}",
                 "source": "human"} for i in range(3) for n in range(2)]
    db.seed([f"im{i}.jpg" for i in range(3)], unit(3, 4), captions, unit(6, 5, seed=1))
    return db


def snapshot(db_dir):
    return {f: (db_dir / f).read_bytes() for f in FILES}


def add(db, image_id="exp.jpg", model="vlm-a", caption="a generated caption", seed=2):
    db.add_experiment(image_id, unit(1, 4, seed)[0], caption, unit(1, 5, seed)[0],
                      vlm_model=model, experiment_index=7, timestamp="2026-11-23T12:00:00+00:00")


def test_seed_writes_three_plain_json_files_that_load_back(tmp_path):
    db = seeded(tmp_path)
    for name in FILES:
        data = json.loads((tmp_path / name).read_text())
        assert data["version"] == 1
    images = json.loads((tmp_path / IMAGE_DB).read_text())
    assert images["model"] == "clip" and images["dim"] == 4 and len(images["entries"]) == 3
    assert json.loads((tmp_path / CAPTION_EMBEDDING_DB).read_text())["model"] == "bge"
    again = DbManager.open(tmp_path, IDENTITY)
    assert not again.needs_seed
    assert again.image_ids == db.image_ids
    np.testing.assert_allclose(again.image_vectors, db.image_vectors, atol=1e-7)
    np.testing.assert_allclose(again.caption_vectors, db.caption_vectors, atol=1e-7)
    assert again.captions_of("im1.jpg") == ["caption 1 0", "caption 1 1"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_experiment_appends_one_entry_to_each_file(tmp_path):
    db = seeded(tmp_path)
    add(db)
    again = DbManager.open(tmp_path, IDENTITY)
    assert again.image_ids[-1] == "exp.jpg" and len(again.image_ids) == 4
    entry = again.captions[-1]
    assert entry == {"id": generated_caption_id("exp.jpg", "vlm-a"), "image_id": "exp.jpg",
                     "caption": "a generated caption", "source": "generated", "model": "vlm-a",
                     "experiment_index": 7, "timestamp": "2026-11-23T12:00:00+00:00"}
    assert len(again.caption_vectors) == 7
    assert json.loads((tmp_path / IMAGE_DB).read_text())["entries"][-1]["kind"] == "experiment"
    assert again.captions_of("exp.jpg") == ["a generated caption"]


def test_same_image_and_model_replaces_another_model_adds(tmp_path):
    db = seeded(tmp_path)
    add(db, caption="first")
    add(db, caption="second", seed=3)
    again = DbManager.open(tmp_path, IDENTITY)
    assert len(again.image_ids) == 4 and len(again.captions) == 7
    assert again.captions[-1]["caption"] == "second"
    np.testing.assert_allclose(again.caption_vectors[-1], unit(1, 5, 3)[0], atol=1e-7)
    add(again, model="vlm-b", caption="other model")
    final = DbManager.open(tmp_path, IDENTITY)
    assert len(final.image_ids) == 4 and len(final.captions) == 8
    assert {c["model"] for c in final.captions if c["source"] == "generated"} == {"vlm-a", "vlm-b"}


def test_human_captions_are_preferred_as_context(tmp_path):
    db = seeded(tmp_path)
    add(db, image_id="im0.jpg", caption="generated for a training image")
    assert db.captions_of("im0.jpg") == ["caption 0 0", "caption 0 1"]


@pytest.mark.parametrize("name", FILES)
def test_corrupt_file_is_an_error_and_nothing_changes(tmp_path, name):
    seeded(tmp_path)
    (tmp_path / name).write_text('{"format": "recap-')
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=f"{name} is corrupt"):
        DbManager.open(tmp_path, IDENTITY)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["entries"][0].update(embedding=[1.0, None, 0.0, 0.0]), "null"),
    (lambda d: d["entries"][0].update(embedding=[1.0, "x", 0.0, 0.0]), "non-numbers"),
    (lambda d: d["entries"][1].update(embedding=[1.0, 0.0]), "entry 1 is not a 4-d embedding"),
    (lambda d: d["entries"][0].pop("image_id"), "entry 0 is malformed"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), "duplicate id"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="something"), "is not a recap-image-embeddings file"),
])
def test_malformed_image_database_is_an_error(tmp_path, edit, message):
    seeded(tmp_path)
    data = json.loads((tmp_path / IMAGE_DB).read_text())
    edit(data)
    (tmp_path / IMAGE_DB).write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        DbManager.open(tmp_path, IDENTITY)


def test_captions_and_their_embeddings_must_align(tmp_path):
    seeded(tmp_path)
    data = json.loads((tmp_path / CAPTION_EMBEDDING_DB).read_text())
    data["entries"].reverse()
    (tmp_path / CAPTION_EMBEDDING_DB).write_text(json.dumps(data))
    with pytest.raises(UserError, match="different caption ids"):
        DbManager.open(tmp_path, IDENTITY)


@pytest.mark.parametrize("field, value, flag", [
    ("clip_model", "other-clip", "--clip-model-name"),
    ("caption_model", "other-bge", "--caption-embedding-model"),
    ("split", "other-split", "--random-seed"),
])
def test_database_of_other_models_or_split_is_refused(tmp_path, field, value, flag):
    seeded(tmp_path)
    other = DbIdentity(**{**IDENTITY.__dict__, field: value})
    with pytest.raises(UserError, match=flag):
        DbManager.open(tmp_path, other)


def test_data_set_name_alone_may_change(tmp_path):
    seeded(tmp_path)
    moved = DbIdentity(**{**IDENTITY.__dict__, "dataset": "/elsewhere/flickr"})
    assert not DbManager.open(tmp_path, moved).needs_seed


def test_incomplete_database_is_an_error_not_a_reseed(tmp_path):
    seeded(tmp_path)
    (tmp_path / CAPTION_DB).unlink()
    with pytest.raises(UserError, match="incomplete: captions.json missing"):
        DbManager.open(tmp_path, IDENTITY)


def test_failed_write_leaves_files_and_memory_unchanged(tmp_path, monkeypatch):
    db = seeded(tmp_path)
    before = snapshot(tmp_path)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("db_manager.os.replace", broken)
    with pytest.raises(OSError):
        add(db)
    assert snapshot(tmp_path) == before
    assert len(db.image_ids) == 3 and len(db.captions) == 6
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_vectors_with_nan_or_wrong_dimension_are_rejected(tmp_path):
    db = seeded(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        db.add_experiment("x.jpg", np.full(4, np.nan), "c", unit(1, 5)[0], "m", 0, "t")
    with pytest.raises(UserError, match="4-d vectors"):
        db.add_experiment("x.jpg", unit(1, 6)[0], "c", unit(1, 5)[0], "m", 0, "t")
    assert snapshot(tmp_path) == before


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": np.float32(0.5), "v": np.arange(3, dtype=np.float32)})
    assert json.loads(path.read_text()) == {"a": 0.5, "v": [0.0, 1.0, 2.0]}
    write_json_atomic(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert os.listdir(path.parent) == ["r.json"]

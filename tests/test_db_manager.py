"""The three databases: seeding, appending, replacing, crash safety, concurrent
writers, checks and repairs, and refusing bad files."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import db_check
import db_format
import db_journal
import db_manager
from db_manager import (CAPTION_DB, CAPTION_EMBEDDING_DB, FILES, IMAGE_DB, WORK, DbIdentity,
                        DbManager, check_db, generated_caption_id, repair_db)
from errors import UserError

IDENTITY = DbIdentity(clip_model="clip", caption_model="bge", dataset="flickr", split="abc")
WRITER = Path(__file__).resolve().parent / "db_writer.py"


def unit(rows, dim, seed=0):
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def human_captions(n_images, per_image=2):
    return [{"id": f"im{i}.jpg#{n}", "image_id": f"im{i}.jpg", "caption": f"caption {i} {n}",
             "source": "human"} for i in range(n_images) for n in range(per_image)]


def seeded(db_dir, identity=IDENTITY, n_images=3):
    db = DbManager.open(db_dir, identity)
    assert db.needs_seed
    db.seed([f"im{i}.jpg" for i in range(n_images)], unit(n_images, 4),
            human_captions(n_images), unit(2 * n_images, 5, seed=1))
    return db


def snapshot(db_dir):
    return {f: (Path(db_dir) / f).read_bytes() for f in FILES}


def add(db, image_id="exp.jpg", model="vlm-a", caption="a generated caption", seed=2):
    db.add_experiment(image_id, unit(1, 4, seed)[0], caption, unit(1, 5, seed)[0],
                      vlm_model=model, experiment_index=7, timestamp="2026-11-23T12:00:00+00:00")


def load_all(db_dir):
    return {f: json.loads((Path(db_dir) / f).read_text()) for f in FILES}


def run_writer(db_dir, prefix, count, crash=None, timeout=60):
    args = [sys.executable, str(WRITER), str(db_dir), prefix, str(count)] + ([crash] if crash else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


# --- seeding and appending ----------------------------------------------------------

def test_seed_writes_three_plain_json_files_that_load_back(tmp_path):
    db = seeded(tmp_path)
    data = load_all(tmp_path)
    assert {d["version"] for d in data.values()} == {1}
    assert data[IMAGE_DB]["model"] == "clip" and data[IMAGE_DB]["dim"] == 4
    assert len(data[IMAGE_DB]["entries"]) == 3
    assert data[CAPTION_EMBEDDING_DB]["model"] == "bge" and data[CAPTION_EMBEDDING_DB]["dim"] == 5
    again = DbManager.open(tmp_path, IDENTITY)
    assert not again.needs_seed and again.image_ids == db.image_ids
    np.testing.assert_array_equal(again.image_vectors, unit(3, 4))
    np.testing.assert_array_equal(again.caption_vectors, unit(6, 5, seed=1))
    np.testing.assert_array_equal(np.array([e["embedding"] for e in data[IMAGE_DB]["entries"]],
                                           dtype=np.float32), unit(3, 4))
    assert again.captions_of("im1.jpg") == ["caption 1 0", "caption 1 1"]
    assert check_db(tmp_path) == []


def test_json_files_have_one_entry_per_line(tmp_path):
    seeded(tmp_path)
    lines = (tmp_path / CAPTION_DB).read_text().splitlines()
    assert lines[0].endswith('"entries":[') and lines[-1] == "]}" and len(lines) == 2 + 6


def test_experiment_appends_one_entry_to_each_file(tmp_path):
    db = seeded(tmp_path)
    add(db)
    data = load_all(tmp_path)
    assert [len(d["entries"]) for d in data.values()] == [4, 7, 7]
    assert data[IMAGE_DB]["entries"][-1]["kind"] == "experiment"
    entry = data[CAPTION_DB]["entries"][-1]
    assert entry == {"id": generated_caption_id("exp.jpg", "vlm-a"), "image_id": "exp.jpg",
                     "caption": "a generated caption", "source": "generated", "model": "vlm-a",
                     "experiment_index": 7, "timestamp": "2026-11-23T12:00:00+00:00"}
    again = DbManager.open(tmp_path, IDENTITY)
    assert again.image_ids[-1] == "exp.jpg" and again.captions_of("exp.jpg") == [
        "a generated caption"]
    np.testing.assert_array_equal(again.caption_vectors[-1], unit(1, 5, 2)[0])
    assert db.image_ids == again.image_ids and len(db.caption_vectors) == 7   # in memory too
    assert check_db(tmp_path) == []
    assert not (tmp_path / WORK / db_manager.JOURNAL).read_bytes()


def test_same_image_and_model_replaces_another_model_adds(tmp_path):
    db = seeded(tmp_path)
    add(db, caption="first")
    add(db, caption="second", seed=3)
    again = DbManager.open(tmp_path, IDENTITY)
    assert len(again.image_ids) == 4 and len(again.captions) == 7
    assert again.captions[-1]["caption"] == "second"
    np.testing.assert_array_equal(again.caption_vectors[-1], unit(1, 5, 3)[0])
    assert check_db(tmp_path) == []
    add(again, model="vlm-b", caption="other model")
    final = DbManager.open(tmp_path, IDENTITY)
    assert len(final.image_ids) == 4 and len(final.captions) == 8
    assert {c["model"] for c in final.captions if c["source"] == "generated"} == {"vlm-a", "vlm-b"}
    assert check_db(tmp_path) == []


def test_a_rerun_writes_over_the_old_entry_in_place(tmp_path, monkeypatch):
    db = seeded(tmp_path)
    add(db, caption="first")
    sizes = {f: (tmp_path / f).stat().st_size for f in FILES}
    monkeypatch.setattr(db_journal, "write_json_file", lambda *a: pytest.fail("file rewritten"))
    add(db, caption="a second, longer caption of the same image", seed=3)
    assert {f: (tmp_path / f).stat().st_size for f in FILES} == sizes   # same bytes, new entry
    data = load_all(tmp_path)
    generated = [c for c in data[CAPTION_DB]["entries"] if c["source"] == "generated"]
    assert [c["caption"] for c in generated] == ["a second, longer caption of the same image"]
    assert data[CAPTION_EMBEDDING_DB]["entries"][-1]["embedding"] == pytest.approx(
        unit(1, 5, 3)[0].tolist())
    assert db.captions[-1]["caption"] == generated[0]["caption"]          # in memory too
    np.testing.assert_array_equal(db.caption_vectors[-1], unit(1, 5, 3)[0])
    assert DbManager.open(tmp_path, IDENTITY).captions == db.captions
    assert check_db(tmp_path) == []


def test_a_rerun_too_long_for_the_old_room_rewrites_the_caption_files(tmp_path):
    db = seeded(tmp_path)
    add(db, caption="short")
    other = DbManager.open(tmp_path, IDENTITY)
    add(db, caption="a far longer caption " * 50, seed=3)
    data = load_all(tmp_path)
    assert data[CAPTION_DB]["entries"][-1]["caption"] == "a far longer caption " * 50
    assert len(data[CAPTION_DB]["entries"]) == 7 and check_db(tmp_path) == []
    add(other, image_id="new.jpg", seed=4)        # a stale handle reloads the rewritten files
    assert other.captions[-2]["caption"] == "a far longer caption " * 50
    add(db, caption="short again", seed=5)        # back in place, in the new room
    assert DbManager.open(tmp_path, IDENTITY).captions[-2]["caption"] == "short again"
    assert check_db(tmp_path) == []


def test_a_database_without_the_slot_table_gets_one_on_the_first_rerun(tmp_path, monkeypatch):
    db = seeded(tmp_path)
    add(db, caption="first")
    (tmp_path / WORK / "caption_slots.i64").unlink()    # as an earlier version left it
    again = DbManager.open(tmp_path, IDENTITY)
    monkeypatch.setattr(db_journal, "write_json_file", lambda *a: pytest.fail("file rewritten"))
    add(again, caption="second", seed=3)
    add(again, image_id="new.jpg", seed=4)
    assert [c["caption"] for c in DbManager.open(tmp_path, IDENTITY).captions[-2:]] == [
        "second", "a generated caption"]
    assert check_db(tmp_path) == []


def test_check_models_names_what_the_database_holds_and_what_was_asked(tmp_path):
    db = seeded(tmp_path)
    db.check_models(clip_model="clip", caption_model="bge")
    db.check_models(caption_model="bge")
    with pytest.raises(UserError) as err:
        db.check_models(clip_model="other-clip", caption_model="other-bge")
    message = str(err.value)
    assert "\n" not in message and "CLIP model 'clip', not 'other-clip'" in message
    assert "caption model 'bge', not 'other-bge'" in message
    assert "--clip-model-name and --caption-embedding-model" in message
    assert db.state.clip_model == "clip" and db.state.caption_dim == 5


def test_human_captions_are_preferred_as_context(tmp_path):
    db = seeded(tmp_path)
    add(db, image_id="im0.jpg", caption="generated for a training image")
    assert db.captions_of("im0.jpg") == ["caption 0 0", "caption 0 1"]
    assert len(db.image_ids) == 3      # the image was known: no second embedding


def test_append_does_not_parse_the_json_files(tmp_path, monkeypatch):
    db = seeded(tmp_path)
    monkeypatch.setattr(db_check, "read_json", lambda *a: pytest.fail("JSON parsed"))
    add(db)
    DbManager.open(tmp_path, IDENTITY)


def test_a_second_handle_sees_what_the_first_appended(tmp_path):
    first = seeded(tmp_path)
    second = DbManager.open(tmp_path, IDENTITY)
    add(first, image_id="a.jpg")
    add(second, image_id="b.jpg")          # merges a.jpg before appending
    assert second.image_ids[-2:] == ["a.jpg", "b.jpg"]
    assert [e["image_id"] for e in load_all(tmp_path)[IMAGE_DB]["entries"]][-2:] == [
        "a.jpg", "b.jpg"]
    add(first, image_id="a.jpg", caption="again", seed=5)   # a replacement after a merge
    assert DbManager.open(tmp_path, IDENTITY).captions_of("a.jpg") == ["again"]
    assert check_db(tmp_path) == []


def test_older_single_line_databases_are_imported(tmp_path):
    """A database written by the first version (compact JSON, no working copy) opens."""
    header = {"dataset": "flickr", "split": "abc", "version": 1}
    images = {**header, "format": "recap-image-embeddings", "model": "clip", "dim": 4,
              "entries": [{"image_id": "im0.jpg", "kind": "train",
                           "embedding": unit(1, 4)[0].tolist()}]}
    captions = {**header, "format": "recap-captions",
                "entries": [{"id": "im0.jpg#0", "image_id": "im0.jpg", "caption": "c",
                             "source": "human"}]}
    embeddings = {"format": "recap-caption-embeddings", "version": 1, "model": "bge", "dim": 5,
                  "entries": [{"id": "im0.jpg#0", "image_id": "im0.jpg",
                               "embedding": unit(1, 5)[0].tolist()}]}
    for name, data in ((IMAGE_DB, images), (CAPTION_DB, captions), (CAPTION_EMBEDDING_DB, embeddings)):
        (tmp_path / name).write_bytes(orjson.dumps(data))
    db = DbManager.open(tmp_path, IDENTITY)
    assert db.image_ids == ["im0.jpg"] and db.captions_of("im0.jpg") == ["c"]
    add(db)
    assert check_db(tmp_path) == [] and len(load_all(tmp_path)[IMAGE_DB]["entries"]) == 2


# --- refusing bad files ----------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_truncated_file_is_an_error_naming_it_and_the_fix(tmp_path, name):
    seeded(tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-40])
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=f"{name} is corrupt.*--repair-db"):
        DbManager.open(tmp_path, IDENTITY)
    assert snapshot(tmp_path) == before
    assert any(name in p for p in check_db(tmp_path))


def test_an_edit_that_keeps_the_size_is_refused_at_start(tmp_path):
    # `python main.py` after changing one word of captions.json (same byte count)
    add(seeded(tmp_path), caption="a pagoda by a lake")
    path = tmp_path / CAPTION_DB
    path.write_bytes(path.read_bytes().replace(b"pagoda", b"PAGODA"))
    before = snapshot(tmp_path), (tmp_path / WORK / "state.json").read_bytes()
    with pytest.raises(UserError, match=r"captions.json was changed by another program since "
                                        r"the last save.*--repair-db") as error:
        DbManager.open(tmp_path, IDENTITY)
    assert "\n" not in str(error.value)
    assert (snapshot(tmp_path), (tmp_path / WORK / "state.json").read_bytes()) == before
    assert any("changed by another program" in p for p in check_db(tmp_path))


def test_the_start_up_check_reads_no_json_file_while_their_stat_is_unchanged(tmp_path,
                                                                            monkeypatch):
    add(seeded(tmp_path))
    read = []
    monkeypatch.setattr(db_format, "_crcs", lambda *a: read.append(a) or {})
    DbManager.open(tmp_path, IDENTITY)
    assert read == []


def test_a_copied_database_is_checked_by_content_and_opens(tmp_path):
    # cp -r memory/ copy/ : new inodes and times, same bytes
    db = seeded(tmp_path / "memory")
    add(db)
    shutil.copytree(tmp_path / "memory", tmp_path / "copy")
    copy = DbManager.open(tmp_path / "copy", IDENTITY)
    assert copy.image_ids == db.image_ids
    add(copy, image_id="second.jpg", seed=3)   # the seals it re-made keep working
    assert check_db(tmp_path / "copy") == []
    assert "second.jpg" in DbManager.open(tmp_path / "copy", IDENTITY).image_ids


def test_saves_keep_the_seals_current_across_appends_reruns_and_rewrites(tmp_path):
    db = seeded(tmp_path)
    add(db)
    add(db, caption="a shorter rerun")                    # in place
    add(db, caption="a much longer rerun " * 40)          # the caption files rewritten whole
    db.add_images(["big.jpg"], unit(1, 4, 9), [{"id": "big.jpg#0", "image_id": "big.jpg",
                  "caption": "x" * (3 << 20), "source": "human"}], unit(1, 5, 9))
    state = DbManager.open(tmp_path, IDENTITY).state
    for name in FILES:
        assert state.seals[name] == db_format.seal(tmp_path / name), name
    path = tmp_path / CAPTION_DB                            # an edit past the first block
    blob = bytearray(path.read_bytes())
    blob[(2 << 20) + 5] ^= 0x20
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="changed by another program"):
        DbManager.open(tmp_path, IDENTITY)


def test_a_database_saved_before_seals_gets_them_at_its_first_open(tmp_path):
    add(seeded(tmp_path))
    state_path = tmp_path / WORK / "state.json"
    state = orjson.loads(state_path.read_bytes())
    state.pop("seals")
    state_path.write_bytes(orjson.dumps(state))
    assert DbManager.open(tmp_path, IDENTITY).state.seals.keys() == set(FILES)
    assert set(orjson.loads(state_path.read_bytes())["seals"]) == set(FILES)


MALFORMED = [
    (lambda d: d["entries"][0].update(embedding=[1.0, None, 0.0, 0.0]), "null"),
    (lambda d: d["entries"][0].update(embedding=[1.0, "x", 0.0, 0.0]), "non-numbers"),
    (lambda d: d["entries"][1].update(embedding=[1.0, 0.0]), "entry 1 is not a 4-d embedding"),
    (lambda d: d["entries"][0].pop("image_id"), "entry 0 is malformed"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), "duplicate id"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="something"), "is not a recap-image-embeddings file"),
]


@pytest.mark.parametrize("edit, message", MALFORMED)
def test_malformed_image_database_is_found_by_check_and_refused_on_import(tmp_path, edit, message):
    seeded(tmp_path)
    data = json.loads((tmp_path / IMAGE_DB).read_text())
    edit(data)
    (tmp_path / IMAGE_DB).write_text(json.dumps(data))
    assert any(message in p for p in check_db(tmp_path))
    with pytest.raises(UserError, match="--repair-db"):        # size changed under us
        DbManager.open(tmp_path, IDENTITY)
    shutil.rmtree(tmp_path / WORK)                               # import validates everything
    with pytest.raises(UserError, match=message):
        DbManager.open(tmp_path, IDENTITY)


def test_caption_embeddings_are_matched_to_captions_by_id(tmp_path):
    db = seeded(tmp_path)
    vectors = np.array(db.caption_vectors)
    shutil.rmtree(tmp_path / WORK)
    data = json.loads((tmp_path / CAPTION_EMBEDDING_DB).read_text())
    data["entries"].reverse()                          # another order: the same vectors
    (tmp_path / CAPTION_EMBEDDING_DB).write_text(json.dumps(data))
    assert np.array_equal(DbManager.open(tmp_path, IDENTITY).caption_vectors, vectors)
    assert check_db(tmp_path) == []

    shutil.rmtree(tmp_path / WORK)
    data["entries"][0]["id"] = "not-a-caption#0"
    (tmp_path / CAPTION_EMBEDDING_DB).write_text(json.dumps(data))
    with pytest.raises(UserError, match="not-a-caption#0.*does not list"):
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


PROMPTED = DbIdentity(**{**IDENTITY.__dict__, "query_prompt": "query: ",
                         "document_prompt": "passage: "})


def test_caption_prompts_are_recorded_and_other_prompts_refused(tmp_path):
    seeded(tmp_path, PROMPTED)
    db = DbManager.open(tmp_path, PROMPTED)
    assert db.caption_prompts == ("query: ", "passage: ")
    header = json.loads((tmp_path / CAPTION_EMBEDDING_DB).read_text())
    assert (header["query_prompt"], header["document_prompt"]) == ("query: ", "passage: ")
    with pytest.raises(UserError, match="document \\(caption\\) prompt 'passage: ', not ''"):
        DbManager.open(tmp_path, DbIdentity(**{**PROMPTED.__dict__, "document_prompt": ""}))
    with pytest.raises(UserError, match="--caption-query-prompt 'query: '"):
        db.check_caption_prompts("other: ", "passage: ")
    assert not DbManager.open(tmp_path, IDENTITY).needs_seed    # no prompts given: not checked


def test_caption_prompts_survive_a_copy_of_the_json_files_alone(tmp_path):
    seeded(tmp_path / "a", PROMPTED)
    (tmp_path / "b").mkdir()
    for name in FILES:
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    assert DbManager.open(tmp_path / "b").caption_prompts == ("query: ", "passage: ")


def test_a_database_made_before_prompts_were_recorded_had_no_document_prompt(tmp_path):
    seeded(tmp_path)
    db = DbManager.open(tmp_path, IDENTITY)
    assert db.caption_prompts is None
    db.check_caption_prompts("any query prompt: ", "")
    with pytest.raises(UserError, match="document \\(caption\\) prompt '', not 'passage: '"):
        DbManager.open(tmp_path, PROMPTED)


def test_data_set_name_alone_may_change(tmp_path):
    seeded(tmp_path)
    moved = DbIdentity(**{**IDENTITY.__dict__, "dataset": "/elsewhere/flickr"})
    assert not DbManager.open(tmp_path, moved).needs_seed


def test_missing_file_is_an_error_not_a_reseed(tmp_path):
    seeded(tmp_path)
    (tmp_path / CAPTION_DB).unlink()
    with pytest.raises(UserError, match="captions.json is missing"):
        DbManager.open(tmp_path, IDENTITY)
    shutil.rmtree(tmp_path / WORK)
    with pytest.raises(UserError, match="incomplete: captions.json missing"):
        DbManager.open(tmp_path, IDENTITY)


def test_vectors_with_nan_or_wrong_dimension_are_rejected(tmp_path):
    db = seeded(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        db.add_experiment("x.jpg", np.full(4, np.nan), "c", unit(1, 5)[0], "m", 0, "t")
    with pytest.raises(UserError, match="4-d vectors"):
        db.add_experiment("x.jpg", unit(1, 6)[0], "c", unit(1, 5)[0], "m", 0, "t")
    assert snapshot(tmp_path) == before


def test_read_only_database_folder_is_a_clear_error(tmp_path, monkeypatch):
    seeded(tmp_path)
    before = snapshot(tmp_path)
    if os.geteuid() == 0:   # root writes anywhere: make the OS answer as for a read-only folder
        import filelock

        def denied(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", self.lock_file)
        monkeypatch.setattr(filelock.FileLock, "acquire", denied)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            DbManager.open(tmp_path, IDENTITY)
    finally:
        os.chmod(tmp_path, 0o755)
    assert snapshot(tmp_path) == before


# --- failures while writing ---------------------------------------------------------------

@pytest.mark.parametrize("victim, write", [
    ("append_json", "new"), ("write_at", "new"), ("write_bytes_atomic", "new"),
    ("write_at", "rerun"), ("write_bytes_atomic", "rerun"),
    ("write_at", "longer rerun"), ("write_json_file", "longer rerun"),
    ("write_bytes_atomic", "longer rerun"),
])
def test_disk_full_leaves_files_and_memory_unchanged(tmp_path, monkeypatch, victim, write):
    db = seeded(tmp_path)
    add(db)
    before, images, captions = snapshot(tmp_path), list(db.image_ids), list(db.captions)
    vectors = np.array(db.caption_vectors)

    real, calls = getattr(db_journal, victim), []

    def disk_full(*args, **kwargs):   # the first call fails; putting things back works
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(db_journal, victim, disk_full)
    caption = "a much longer caption " * 40 if write == "longer rerun" else "new"
    with pytest.raises(OSError) as err:
        add(db, image_id="new.jpg" if write == "new" else "exp.jpg", caption=caption, seed=9)
    assert err.value.errno == 28
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert db.image_ids == images and db.captions == captions
    np.testing.assert_array_equal(db.caption_vectors, vectors)
    assert check_db(tmp_path) == []
    add(db, caption="after the disk was freed", seed=10)
    assert check_db(tmp_path) == []


def test_ctrl_c_during_a_write_leaves_everything_as_it_was(tmp_path, monkeypatch):
    db = seeded(tmp_path)
    before = snapshot(tmp_path)
    real, calls = db_journal.append_json, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(db_journal, "append_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add(db)
    assert snapshot(tmp_path) == before and check_db(tmp_path) == []


# --- crashes (a killed process leaves no chance to roll back) ------------------------------

@pytest.mark.parametrize("point, saved", [
    ("journal", False),            # torn journal line: never acknowledged, dropped
    ("json:1", True),              # journal durable, one JSON file appended: completed
    ("json:3", True),
    ("state", True),               # everything appended, not committed: completed
    ("truncate-journal", True),    # committed, journal not yet emptied
])
def test_crash_at_each_point_gives_all_three_entries_or_none(tmp_path, point, saved, caplog):
    seeded(tmp_path)
    out = run_writer(tmp_path, "crash", 1, crash=point)
    assert out.returncode == 9 and "ack" not in out.stdout
    db = DbManager.open(tmp_path, IDENTITY)
    assert ("crash-0.jpg" in db.image_ids) == saved
    assert (generated_caption_id("crash-0.jpg", "vlm") in {c["id"] for c in db.captions}) == saved
    assert check_db(tmp_path) == []
    counts = [len(d["entries"]) for d in load_all(tmp_path).values()]
    assert counts == ([4, 7, 7] if saved else [3, 6, 6])
    if point != "truncate-journal":
        assert any(word in caplog.text for word in ("completed", "dropped"))


def test_killed_writers_never_lose_an_acknowledged_experiment(tmp_path):
    """Fault injection: SIGKILL at random moments of a stream of appends."""
    seeded(tmp_path)
    rng = random.Random(1234)
    acknowledged: set[str] = set()
    trials = 50
    start = time.perf_counter()
    run_writer(tmp_path, "warm-up", 1)
    startup = time.perf_counter() - start  # longer on a busy machine: kill later there
    for trial in range(trials):
        proc = subprocess.Popen([sys.executable, str(WRITER), str(tmp_path), f"t{trial}", "40"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, 1.0) * startup + rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        # only whole lines: SIGKILL can cut the last one ("ack" without its id)
        acknowledged |= {line.split()[1] for line in out.split("\n")[:-1]
                         if line.startswith("ack ") and len(line.split()) == 2}
    db = DbManager.open(tmp_path, IDENTITY)
    assert acknowledged <= set(db.image_ids)
    assert len(acknowledged) > trials        # the writers got somewhere
    assert check_db(tmp_path) == []
    data = load_all(tmp_path)
    assert len(data[IMAGE_DB]["entries"]) - 3 == len(data[CAPTION_DB]["entries"]) - 6


def test_concurrent_writers_lose_nothing(tmp_path):
    seeded(tmp_path)
    writers, appends = 4, 10
    procs = [subprocess.Popen([sys.executable, str(WRITER), str(tmp_path), f"w{w}", str(appends)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.count("ack") == appends
    db = DbManager.open(tmp_path, IDENTITY)
    expected = {f"w{w}-{n}.jpg" for w in range(writers) for n in range(appends)}
    assert set(db.image_ids) - {f"im{i}.jpg" for i in range(3)} == expected
    assert len(db.image_ids) == 3 + writers * appends
    assert len(db.captions) == 6 + writers * appends
    assert check_db(tmp_path) == []


def test_interrupted_first_run_is_cleaned_up(tmp_path, monkeypatch):
    db = DbManager.open(tmp_path / "db", IDENTITY)
    real = os.replace

    def die_before_commit(src, dst):
        if Path(dst).name == WORK:
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(db_manager.os, "replace", die_before_commit)
    with pytest.raises(KeyboardInterrupt):
        db.seed(["a.jpg"], unit(1, 4), human_captions(0), np.zeros((0, 5), np.float32))
    monkeypatch.undo()
    assert (tmp_path / "db" / IMAGE_DB).exists()        # moved, but not committed
    again = DbManager.open(tmp_path / "db", IDENTITY)
    assert again.needs_seed and not (tmp_path / "db" / IMAGE_DB).exists()
    seeded(tmp_path / "db")


# --- check and repair --------------------------------------------------------------------

def test_repair_finishes_an_interrupted_write_after_a_backup(tmp_path):
    seeded(tmp_path)
    run_writer(tmp_path, "crash", 1, crash="json:2")
    assert any("unfinished write" in p for p in check_db(tmp_path))
    report = repair_db(tmp_path)
    assert report[0].startswith("backup of everything as it was:")
    backup = Path(report[0].split(": ", 1)[1])
    assert (backup / IMAGE_DB).exists() and (backup / WORK / db_manager.JOURNAL).exists()
    assert any("completed" in line for line in report) and report[-1] == "no problems left"
    assert check_db(tmp_path) == []


def test_repair_rebuilds_a_damaged_json_file_from_the_working_copy(tmp_path):
    db = seeded(tmp_path)
    add(db)
    good = snapshot(tmp_path)
    (tmp_path / CAPTION_EMBEDDING_DB).write_bytes(good[CAPTION_EMBEDDING_DB][:100])
    report = repair_db(tmp_path)
    assert any("rebuilt the three JSON files" in line for line in report)
    assert snapshot(tmp_path) == good


def test_repair_trusts_valid_json_restored_by_the_user(tmp_path):
    db = seeded(tmp_path)
    restored = snapshot(tmp_path)
    add(db)
    for name, blob in restored.items():        # the user restores the JSON of before
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(UserError, match="--repair-db"):
        DbManager.open(tmp_path, IDENTITY)
    assert any("rebuilt the working copy" in line for line in repair_db(tmp_path))
    assert "exp.jpg" not in DbManager.open(tmp_path, IDENTITY).image_ids


def test_repair_reports_what_it_cannot_fix(tmp_path):
    seeded(tmp_path)
    (tmp_path / IMAGE_DB).write_text("garbage")
    (tmp_path / WORK / db_manager.STATE).write_text("garbage")
    with pytest.raises(UserError, match="cannot repair.*restore a backup"):
        repair_db(tmp_path)


# --- properties ---------------------------------------------------------------------------

CAPTION_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(captions=st.lists(CAPTION_TEXT, min_size=1, max_size=6),
       ids=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6, unique=True),
       seed=st.integers(0, 2**16))
def test_round_trip_of_any_text_and_vectors(tmp_path_factory, captions, ids, seed):
    db_dir = tmp_path_factory.mktemp("prop")
    db = DbManager.open(db_dir, IDENTITY)
    db.seed(ids, unit(len(ids), 4, seed), [], np.zeros((0, 5), np.float32))
    for n, caption in enumerate(captions):
        db.add_experiment(ids[n % len(ids)], unit(1, 4, seed + n)[0], caption,
                          unit(1, 5, seed + n)[0], vlm_model="v", experiment_index=n,
                          timestamp="t")
    again = DbManager.open(db_dir, IDENTITY)
    expected = {}
    for n, caption in enumerate(captions):
        expected[ids[n % len(ids)]] = (caption, n)
    assert {c["image_id"]: (c["caption"], c["experiment_index"]) for c in again.captions} == expected
    assert json.loads((db_dir / CAPTION_DB).read_text())["entries"] == again.captions
    np.testing.assert_array_equal(again.image_vectors, unit(len(ids), 4, seed))
    assert check_db(db_dir) == []


# --- many rows in one write (add_images: main.py --import-parquet) ------------------------

def imported(n, prefix="col", seed=20):
    ids = [f"/photos/{prefix}-{i}.jpg" for i in range(n)]
    captions = [{"id": generated_caption_id(i, "vlm"), "image_id": i, "caption": f"caption of {i}",
                 "source": "generated", "model": "vlm", "imported_from": "/out"} for i in ids]
    return ids, unit(n, 4, seed), captions, unit(n, 5, seed + 1)


def test_add_images_appends_many_rows_in_one_write(tmp_path):
    db = seeded(tmp_path)
    seq = db.state.seq
    assert db.add_images(*imported(5)) == (5, 5)
    assert db.state.seq == seq + 1                       # one journaled write
    data = load_all(tmp_path)
    assert [len(d["entries"]) for d in data.values()] == [8, 11, 11]
    assert [e["kind"] for e in data[IMAGE_DB]["entries"]][-5:] == ["imported"] * 5
    again = DbManager.open(tmp_path, IDENTITY)
    ids, image_vectors, captions, caption_vectors = imported(5)
    assert again.image_ids[-5:] == ids and again.captions[-5:] == captions
    np.testing.assert_array_equal(again.image_vectors[-5:], image_vectors)
    np.testing.assert_array_equal(again.caption_vectors[-5:], caption_vectors)
    assert check_db(tmp_path) == []
    before = snapshot(tmp_path)
    assert again.add_images(*imported(5)) == (0, 0)         # the same rows again: nothing
    assert db.add_images(*imported(7)) == (2, 2)            # a stale handle merges first
    assert len(DbManager.open(tmp_path, IDENTITY).image_ids) == 3 + 7
    assert snapshot(tmp_path) != before and check_db(tmp_path) == []


def test_add_images_refuses_bad_rows_and_writes_nothing(tmp_path):
    db = seeded(tmp_path)
    before = snapshot(tmp_path)
    ids, image_vectors, captions, caption_vectors = imported(3)
    with pytest.raises(UserError, match="4-d vectors"):
        db.add_images(ids, unit(3, 6), captions, caption_vectors)
    with pytest.raises(ValueError, match="NaN"):
        db.add_images(ids, np.full((3, 4), np.nan), captions, caption_vectors)
    with pytest.raises(ValueError, match="neither stored nor in this batch"):
        db.add_images(ids[:2], image_vectors[:2], captions, caption_vectors)
    with pytest.raises(ValueError, match="holds an image id twice"):
        db.add_images(ids[:1] * 2, image_vectors[:2], [], np.zeros((0, 5), np.float32))
    assert snapshot(tmp_path) == before and check_db(tmp_path) == []


@pytest.mark.parametrize("victim, failing", [
    ("append_json", 2), ("write_at", 3), ("write_bytes_atomic", 1),   # 1: the commit itself
])
def test_disk_full_during_add_images_leaves_everything_unchanged(tmp_path, monkeypatch, victim,
                                                                 failing):
    db = seeded(tmp_path)
    before, images, captions = snapshot(tmp_path), list(db.image_ids), list(db.captions)
    real, calls = getattr(db_journal, victim), []

    def disk_full(*args, **kwargs):   # files were appended before this call fails
        calls.append(1)
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(db_journal, victim, disk_full)
    with pytest.raises(OSError):
        db.add_images(*imported(4))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert db.image_ids == images and db.captions == captions
    assert check_db(tmp_path) == []
    assert db.add_images(*imported(4)) == (4, 4) and check_db(tmp_path) == []


# Run in tests/ (the working directory is on a `-c` script's path) to import its helpers.
BATCH_WRITER = """
import sys
import db_manager, db_writer, test_db_manager
db_writer.crash_at(sys.argv[2])
db = db_manager.DbManager.open(sys.argv[1])
db.add_images(*test_db_manager.imported(6))
print("ack", flush=True)
"""


@pytest.mark.parametrize("point, saved", [
    ("journal", False), ("json:1", True), ("json:3", True), ("state", True),
    ("truncate-journal", True),
])
def test_crash_during_add_images_gives_every_row_or_none(tmp_path, point, saved, caplog):
    seeded(tmp_path)
    out = subprocess.run([sys.executable, "-c", BATCH_WRITER, str(tmp_path), point],
                         cwd=WRITER.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 9 and "ack" not in out.stdout, out.stderr
    db = DbManager.open(tmp_path, IDENTITY)
    ids = imported(6)[0]
    assert [i in db.image_ids for i in ids] == [saved] * 6
    assert [generated_caption_id(i, "vlm") in {c["id"] for c in db.captions}
            for i in ids] == [saved] * 6
    assert check_db(tmp_path) == []
    counts = [len(d["entries"]) for d in load_all(tmp_path).values()]
    assert counts == ([9, 12, 12] if saved else [3, 6, 6])
    if point not in ("truncate-journal", "journal"):
        assert "completed an interrupted batch of 6 images and 6 captions" in caplog.text


# --- captions without vectors (a first run embeds none of the human captions) -------------

def lazily_seeded(db_dir, n_images=3):
    db = DbManager.open(db_dir, IDENTITY)
    db.seed([f"im{i}.jpg" for i in range(n_images)], unit(n_images, 4), human_captions(n_images),
            caption_dim=5)
    return db


def test_a_memory_seeded_without_caption_vectors_says_which_captions_have_them(tmp_path):
    db = lazily_seeded(tmp_path)
    assert db.missing_caption_rows == list(range(6)) and check_db(tmp_path) == []
    add(db)                                      # a generated caption comes with its vector
    data = load_all(tmp_path)                    # plain json.load, as a user reads them
    assert len(data[CAPTION_DB]["entries"]) == 7
    assert [e["id"] for e in data[CAPTION_EMBEDDING_DB]["entries"]] == ["exp.jpg#gen:vlm-a"]
    assert db_manager.describe_db(tmp_path).startswith("4 images, 7 captions, 1 of them with "
                                                       "vectors (6 human captions")

    assert db.add_caption_vectors([4, 1, 2], unit(3, 5, seed=8)) == 3
    again = DbManager.open(tmp_path, IDENTITY)
    assert again.missing_caption_rows == [0, 3, 5] and check_db(tmp_path) == []
    assert np.array_equal(again.caption_vectors[[4, 1, 2]], unit(3, 5, seed=8))
    ids = [e["id"] for e in load_all(tmp_path)[CAPTION_EMBEDDING_DB]["entries"]]
    assert ids == ["exp.jpg#gen:vlm-a", "im0.jpg#1", "im1.jpg#0", "im2.jpg#0"]
    assert again.add_caption_vectors([1, 0, 3, 5], unit(4, 5, seed=9)) == 3  # 1 had one
    assert again.missing_caption_rows == [] and check_db(tmp_path) == []
    assert "6 human captions" not in db_manager.describe_db(tmp_path)


def test_missing_caption_vectors_survive_a_copy_of_the_json_files_alone(tmp_path):
    db = lazily_seeded(tmp_path)
    add(db)
    db.add_caption_vectors([2, 3], unit(2, 5, seed=8))
    vectors = np.array(db.caption_vectors)
    shutil.rmtree(tmp_path / WORK)                 # the JSON files are the whole truth
    copy = DbManager.open(tmp_path, IDENTITY)
    assert copy.missing_caption_rows == [0, 1, 4, 5] and check_db(tmp_path) == []
    assert np.array_equal(copy.caption_vectors[[2, 3, 6]], vectors[[2, 3, 6]])
    add(copy, caption="a rerun with a much longer caption " * 20)  # rewrites the caption files
    copy.add_caption_vectors([0, 1, 4, 5], unit(4, 5, seed=9))
    assert check_db(tmp_path) == [] and DbManager.open(tmp_path).missing_caption_rows == []


def test_a_rerun_in_a_memory_whose_captions_got_vectors_late_stays_in_place(tmp_path):
    db = lazily_seeded(tmp_path)
    add(db)
    db.add_caption_vectors(list(range(6)), unit(6, 5, seed=8))   # entries after the generated one
    (tmp_path / WORK / "caption_slots.i64").unlink()               # rebuilt, matched by id
    add(db, caption="another caption", seed=3)
    assert check_db(tmp_path) == []
    assert DbManager.open(tmp_path).captions[6]["caption"] == "another caption"


EMBED_WRITER = """
import sys
import db_manager, db_writer, test_db_manager
db_writer.crash_at(sys.argv[2])
db = db_manager.DbManager.open(sys.argv[1])
db.add_caption_vectors([0, 1, 2, 3], test_db_manager.unit(4, 5, seed=8))
print("ack", flush=True)
"""


@pytest.mark.parametrize("point, saved", [
    ("journal", False), ("json:1", True), ("state", True), ("truncate-journal", True),
])
def test_a_crash_while_saving_caption_vectors_gives_all_of_them_or_none(tmp_path, point, saved):
    lazily_seeded(tmp_path)
    out = subprocess.run([sys.executable, "-c", EMBED_WRITER, str(tmp_path), point],
                         cwd=WRITER.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 9 and "ack" not in out.stdout, out.stderr
    db = DbManager.open(tmp_path, IDENTITY)
    assert db.missing_caption_rows == ([4, 5] if saved else list(range(6)))
    assert check_db(tmp_path) == []
    assert len(load_all(tmp_path)[CAPTION_EMBEDDING_DB]["entries"]) == (4 if saved else 0)

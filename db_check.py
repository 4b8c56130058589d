"""Checking and repairing the databases (`main.py --check-db` / `--repair-db`), and
building a working copy from the JSON files alone."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

import db_journal
from atomic_files import write_bytes_atomic
from db_format import (CAPTION_DB, CAPTION_EMBEDDING_DB, FILES, FORMATS, IMAGE_DB, JOURNAL,
                       NEW_WORK, PROMPT_FIELDS, REPAIR, STATE, VERSION, WORK, DbState, as_ranges,
                       check_seals, check_unique, headers, image_entry, map_vectors, new_rows,
                       read_state, settle)
from errors import UserError


def check_db(db_dir: str | os.PathLike) -> list[str]:
    """Every problem found in the databases of `db_dir` (empty list: all good).

    Reads everything: JSON parse, schema, ids aligned across the three files,
    dimensions and models consistent, no NaN/inf, no duplicate ids, and the
    working copy equal to the JSON files.
    """
    db_dir = Path(db_dir)
    problems: list[str] = []
    data: dict[str, dict] = {}
    for name, fmt in FORMATS:
        try:
            data[name] = read_json(db_dir / name, fmt)
        except UserError as exc:
            problems.append(str(exc))
    parsed = None
    if len(data) == len(FILES):
        try:
            parsed = validate(db_dir, data)
        except UserError as exc:
            problems.append(str(exc))
    work = db_dir / WORK
    try:
        state = read_state(work / STATE)
    except UserError as exc:
        return problems + [str(exc)]
    journal = work / JOURNAL
    if journal.exists() and any(r["seq"] > state.seq for r in db_journal.read_journal(journal)[0]):
        problems.append(f"{journal} holds an unfinished write; any command that opens the "
                        "database (or --repair-db) completes it")
    for name in FILES:
        if (db_dir / name).exists() and (db_dir / name).stat().st_size != state.bytes[name]:
            problems.append(f"{db_dir / name} is {(db_dir / name).stat().st_size} bytes, the "
                            f"last committed write left {state.bytes[name]}")
    if not problems:
        try:
            check_seals(db_dir, state)
        except UserError as exc:
            problems.append(str(exc))
    if parsed is not None and not problems:
        try:
            images, captions = new_rows(db_dir, None, state)
            image_vectors = map_vectors(work / "image_vectors.f32", state.images, state.image_dim)
            caption_vectors = map_vectors(work / "caption_vectors.f32", state.captions,
                                          state.caption_dim)
        except (UserError, OSError, ValueError) as exc:
            return problems + [f"working copy {work}: {exc}"]
        if [i["image_id"] for i in images] != [e["image_id"] for e in
                                                data[IMAGE_DB]["entries"]] or \
                captions != data[CAPTION_DB]["entries"]:
            problems.append(f"working copy {work} lists other entries than the JSON files")
        elif state.unembedded != parsed["unembedded"]:
            problems.append(f"working copy {work} lists other captions without vectors than "
                            f"{CAPTION_EMBEDDING_DB}")
        else:
            has_vector = np.ones(state.captions, bool)
            has_vector[state.missing_rows()] = False
            if not (np.array_equal(image_vectors, parsed["image_vectors"]) and np.array_equal(
                    caption_vectors[has_vector], parsed["caption_vectors"][has_vector])):
                problems.append(f"working copy {work} holds other vectors than the JSON files")
        if (state.clip_model, state.caption_model) != (
                data[IMAGE_DB]["model"], data[CAPTION_EMBEDDING_DB]["model"]):
            problems.append(f"{work / STATE} names other models than the JSON files")
    return problems


def describe_db(db_dir: str | os.PathLike) -> str:
    """One line on what the databases of `db_dir` hold, from their last commit."""
    state = read_state(Path(db_dir) / WORK / STATE)
    missing = state.captions - state.embedded
    line = (f"{state.images} images, {state.captions} captions, {state.embedded} of them "
            "with vectors")
    if missing:
        line += (f" ({missing} human captions get theirs at the first text search over "
                 "captions, or now with `python main.py --embed-captions`)")
    return line


def repair_db(db_dir: str | os.PathLike) -> list[str]:
    """Fix what can be fixed, after a timestamped backup; returns what was done.

    First an interrupted write is finished (or dropped) from the journal. If
    problems remain: valid JSON files are the truth (users may have restored
    them from a backup), so the working copy is rebuilt from them; otherwise
    the JSON files are rebuilt from the working copy. UserError if neither is
    usable.
    """
    db_dir = Path(db_dir)
    work = db_dir / WORK
    if not any((db_dir / f).exists() for f in FILES + (WORK,)):
        raise UserError(f"no database in {db_dir}")
    backup = backup_db(db_dir)
    done = [f"backup of everything as it was: {backup}"]
    with db_journal.locked(db_dir):
        if (db_dir / NEW_WORK).exists() and not work.exists():
            done += db_journal.clean_interrupted_create(db_dir)
        try:
            done += db_journal.recover(db_dir)
            state = read_state(work / STATE)
            images, captions = new_rows(db_dir, None, state)
            working_copy = None
        except (UserError, OSError, ValueError, KeyError, TypeError) as exc:
            working_copy = str(exc)
        if not check_db(db_dir):
            return done + ["no problems left"]
        try:
            validate(db_dir, read_all(db_dir))
            json_problem = None
        except UserError as exc:
            json_problem = str(exc)
        if json_problem is None:
            shutil.rmtree(work, ignore_errors=True)
            import_json(db_dir)
            done.append("rebuilt the working copy from the JSON files")
        elif working_copy is None:
            image_vectors = map_vectors(work / "image_vectors.f32", state.images, state.image_dim)
            sizes = dict(state.bytes)
            sizes[IMAGE_DB] = db_journal.write_json_file(
                db_dir / IMAGE_DB, headers(state)[IMAGE_DB],
                (image_entry(i, v) for i, v in zip(images, image_vectors)))[0]
            sizes.update(db_journal.write_caption_files(db_dir, work, state, captions))
            state = db_journal.resealed(db_dir, state, state.but(bytes=sizes))
            write_bytes_atomic(work / STATE, state.to_json())
            settle(state)
            done.append(f"rebuilt the three JSON files from the working copy ({json_problem})")
        else:
            raise UserError(f"cannot repair {db_dir}: the JSON files are damaged ({json_problem}) "
                            f"and so is the working copy ({working_copy}); restore a backup "
                            f"from {db_dir / 'backups'}")
        left = check_db(db_dir)
        if left:
            raise UserError("could not repair: " + "; ".join(left))
    return done + ["no problems left"]


def backup_db(db_dir: str | os.PathLike) -> Path:
    """Copy the databases and working copy to DB_DIR/backups/<timestamp>/."""
    db_dir = Path(db_dir)
    target = db_dir / "backups" / datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    target.mkdir(parents=True)
    for name in FILES:
        if (db_dir / name).exists():
            shutil.copy2(db_dir / name, target / name)
    if (db_dir / WORK).exists():
        shutil.copytree(db_dir / WORK, target / WORK)
    return target


def import_json(db_dir: Path) -> DbState:
    """Build the working copy from the JSON files alone (an older database, or a copy
    without the hidden .recap folder); returns the committed state."""
    data = read_all(db_dir)
    parsed = validate(db_dir, data)
    images, captions, embeddings = data[IMAGE_DB], data[CAPTION_DB], data[CAPTION_EMBEDDING_DB]
    state = DbState(clip_model=images["model"], caption_model=embeddings["model"],
                    dataset=images.get("dataset", ""), split=images.get("split", ""),
                    image_dim=int(parsed["image_vectors"].shape[1]),
                    caption_dim=int(parsed["caption_vectors"].shape[1]),
                    images=len(images["entries"]), captions=len(captions["entries"]),
                    origin="import", unembedded=parsed["unembedded"],
                    **{k: embeddings[k] for k in PROMPT_FIELDS if k in embeddings})
    return db_journal.create(db_dir, state, [e["image_id"] for e in images["entries"]],
                             [e["kind"] for e in images["entries"]], parsed["image_vectors"],
                             captions["entries"], parsed["caption_vectors"])


def read_all(db_dir: Path) -> dict[str, dict[str, Any]]:
    return {name: read_json(db_dir / name, fmt) for name, fmt in FORMATS}


def read_json(path: Path, fmt: str) -> dict[str, Any]:
    """Parse one database JSON file, refusing what is not one."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"database file {path} is missing; {REPAIR}") from None
    except OSError as exc:
        raise UserError(f"database file {path} cannot be read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise UserError(f"database file {path} is corrupt (not valid JSON: {exc}); "
                        f"{REPAIR}") from None
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(
            data.get("entries"), list):
        raise UserError(f"database file {path} is not a {fmt} file")
    if data.get("version") != VERSION:
        raise UserError(f"database file {path} has version {data.get('version')}, "
                        f"this program reads version {VERSION}")
    return data


def validate(db_dir: Path, data: dict[str, dict]) -> dict[str, Any]:
    """Full check of parsed JSON files; returns their vectors ("image_vectors",
    "caption_vectors": one row per caption, zeros for captions without one) and the
    caption rows without a vector ("unembedded", as db_format.as_ranges)."""
    images, captions, embeddings = data[IMAGE_DB], data[CAPTION_DB], data[CAPTION_EMBEDDING_DB]
    _check_entries(db_dir / IMAGE_DB, images["entries"], {"image_id": str, "kind": str})
    _check_entries(db_dir / CAPTION_DB, captions["entries"],
                   {"id": str, "image_id": str, "caption": str, "source": str})
    _check_entries(db_dir / CAPTION_EMBEDDING_DB, embeddings["entries"],
                   {"id": str, "image_id": str})
    for name, d in ((IMAGE_DB, images), (CAPTION_EMBEDDING_DB, embeddings)):
        if not isinstance(d.get("model"), str):
            raise UserError(f"database file {db_dir / name} does not name its model")
    image_ids = [e["image_id"] for e in images["entries"]]
    caption_ids = [c["id"] for c in captions["entries"]]
    check_unique(db_dir / IMAGE_DB, image_ids)
    check_unique(db_dir / CAPTION_DB, caption_ids)
    # caption_embeddings.json: an entry per caption that has a vector, by id (older
    # databases: every caption, in the same order)
    embedded = [e["id"] for e in embeddings["entries"]]
    check_unique(db_dir / CAPTION_EMBEDDING_DB, embedded)
    row_of = {i: n for n, i in enumerate(caption_ids)}
    unknown = next((i for i in embedded if i not in row_of), None)
    if unknown is not None:
        raise UserError(f"{db_dir / CAPTION_EMBEDDING_DB} holds the vector of caption "
                        f"{unknown!r}, which {CAPTION_DB} does not list; restore both from the "
                        "same backup")
    known = set(image_ids)
    orphan = next((c["image_id"] for c in captions["entries"] if c["image_id"] not in known), None)
    if orphan is not None:
        raise UserError(f"{db_dir / CAPTION_DB} has captions of image {orphan!r}, which "
                        f"{IMAGE_DB} does not hold")
    if images.get("split") != captions.get("split"):
        raise UserError(f"{db_dir}: {IMAGE_DB} and {CAPTION_DB} were built from different splits")
    found = _matrix(db_dir / CAPTION_EMBEDDING_DB, embeddings)
    rows = np.array([row_of[i] for i in embedded], np.int64)
    caption_vectors = np.zeros((len(caption_ids), found.shape[1]), np.float32)
    caption_vectors[rows] = found
    return {"image_vectors": _matrix(db_dir / IMAGE_DB, images),
            "caption_vectors": caption_vectors,
            "unembedded": as_ranges(sorted(set(range(len(caption_ids))) - set(rows.tolist())))}


def _check_entries(path: Path, entries: list, fields: dict[str, type]) -> None:
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), t)
                                              for k, t in fields.items()):
            raise UserError(f"database file {path}: entry {n} is malformed "
                            f"(needs {', '.join(fields)})")


def _matrix(path: Path, data: dict[str, Any]) -> np.ndarray:
    entries = data["entries"]
    dim = data.get("dim")
    if not isinstance(dim, int) or dim <= 0:
        raise UserError(f"database file {path} has no valid 'dim'")
    if not entries:
        return np.zeros((0, dim), dtype=np.float32)
    vectors = [e.get("embedding") for e in entries]
    bad = next((n for n, v in enumerate(vectors) if not isinstance(v, list) or len(v) != dim), None)
    if bad is not None:
        raise UserError(f"database file {path}: entry {bad} is not a {dim}-d embedding")
    try:
        matrix = np.array(vectors, dtype=np.float32)  # null becomes NaN, caught below
    except (TypeError, ValueError):
        raise UserError(f"database file {path} has an embedding with non-numbers") from None
    if not np.isfinite(matrix).all():
        raise UserError(f"database file {path} has NaN, null or infinite values")
    return matrix


__all__ = ["check_db", "describe_db", "repair_db", "backup_db", "import_json", "read_json", "validate"]

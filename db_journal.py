"""Writing the databases: every change is one journaled, all-or-nothing write.

One write (`write`), under the lock DB_DIR/.recap.lock:
  1. its record goes to journal.jsonl as one checksummed line, fsynced: from
     here on the write is durable;
  2. the files change (`apply`): appends overwrite the JSON files' closing
     "]}" with ",<entries>]}" and extend the working copy; a rerun's caption
     is written over the old one's bytes in the three caption files (it
     usually fits, see db_format.padded) and its vector over the old row;
     captions getting their first vectors (`embed_record`) append entries to
     caption_embeddings.json and fill their zero rows in place;
  3. commit: state.json is replaced atomically; the rename is the commit;
  4. the folder is fsynced and the journal emptied (`finish`).
An error before 3 (disk full, Ctrl-C) puts every file back as committed
(appended bytes cut, overwritten bytes restored), and if even that fails the
journal stays and the next command completes the write. An error after the
rename does not undo anything: the write is done, the journal stays until the
next write empties it. A crash at any moment: the next command (`recover`)
cuts every file back to the committed lengths and re-applies a complete
journal line; a torn one was never acknowledged and is dropped.

A rerun whose caption does not fit the old one's room rewrites the three
caption files whole instead (each by temp file + rename); recovery then
re-applies it to whichever version of each file it finds.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson

from atomic_files import (append, dumps, fsync_dir, move_into_place, truncate,
                          write_at, write_bytes_atomic)
from db_format import (CAPTION_DB, CAPTION_EMBEDDING_DB, CAPTION_META, CAPTION_SLOTS,
                       CAPTION_TEXT, CAPTION_VECTORS, FILES, IMAGE_DB, IMAGE_META, IMAGE_TEXT,
                       IMAGE_VECTORS, JOURNAL, LOCK, NEW_WORK, REPAIR, SLOT_FILES, STATE, TAIL,
                       WORK, DbState, as_ranges, caption_entry, caption_vector_entry, headers,
                       check_seals, image_entry, json_head, map_vectors, new_rows, read_jsonl,
                       read_state, seal, settle)
from errors import UserError

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 600.0


@contextlib.contextmanager
def locked(db_dir: Path) -> Iterator[None]:
    """Hold DB_DIR/.recap.lock (one writer at a time, across processes)."""
    from filelock import FileLock, Timeout
    try:
        db_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(db_dir / LOCK), timeout=LOCK_TIMEOUT)
        lock.acquire()
    except Timeout:
        raise UserError(f"database {db_dir} stayed locked by another process for "
                        f"{LOCK_TIMEOUT:.0f} s") from None
    except PermissionError:
        raise UserError(f"database folder {db_dir} is not writable") from None
    try:
        yield
    finally:
        lock.release()


# --- records ------------------------------------------------------------------------------
# An append: {"seq", "images": [entry], "image_vectors", "captions": [entry],
# "caption_vectors"}. A rerun: {"seq", "replace": row, "caption", "caption_vector",
# "spans": [[start, length]] per SLOT_FILES, or null when the files are rewritten whole}.
# First vectors: {"seq", "embed": [[start, end]] caption rows, "captions": [{"id",
# "image_id"}] and "caption_vectors", one per row}.

def append_record(seq: int, images: list[dict], image_vectors: np.ndarray, captions: list[dict],
                  caption_vectors: np.ndarray) -> dict[str, Any]:
    return {"seq": seq, "images": images, "image_vectors": image_vectors,
            "captions": captions, "caption_vectors": caption_vectors}


def embed_record(seq: int, rows: list[int], captions: list[dict[str, Any]],
                 vectors: np.ndarray) -> dict[str, Any]:
    """Vectors for caption rows that have none yet (`captions[i]` is row `rows[i]`'s
    entry, `rows` sorted)."""
    return {"seq": seq, "embed": as_ranges(rows),
            "captions": [{"id": c["id"], "image_id": c["image_id"]} for c in captions],
            "caption_vectors": vectors}


def replace_record(db_dir: Path, state: DbState, row: int, caption: dict[str, Any],
                   vector: np.ndarray) -> dict[str, Any]:
    """A rerun's record: in place where the new entries fit the old ones' room."""
    spans = None
    for attempt in range(2):
        try:
            spans = _spans(db_dir, state, row)
            if _holds(db_dir, spans, caption["id"]):
                break
        except (OSError, ValueError, UserError):
            pass
        spans = None
        if attempt == 0:  # no slot table, or a stale one: build it from the files, retry
            build_slots(db_dir, state, force=True)
    blobs = _replacement(caption, vector)
    if spans is not None and any(len(b) > length for b, (_, length) in zip(blobs, spans)):
        spans = None
    if spans is None:
        log.info("the new caption of %s does not fit the old one's room: rewriting the caption "
                 "files", caption["image_id"])
    return {"seq": state.seq + 1, "replace": row, "caption": caption, "caption_vector": vector,
            "spans": spans}


def journal_line(record: dict[str, Any]) -> bytes:
    body = dumps(record)
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def read_journal(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Complete records of the journal, and whether a torn/garbled line was found."""
    records, torn = [], False
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        crc, _, body = line.partition(b" ")
        try:
            if int(crc, 16) != zlib.crc32(body):
                raise ValueError("checksum")
            records.append(_upgrade(orjson.loads(body)))
        except ValueError:
            torn = True
    return records, torn


def _upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record journaled by the previous version (one experiment, or a rewrite)."""
    if "embed" in record:
        return record
    if record.get("replace") is None and "images" not in record:  # one experiment
        image = record["image"]
        return append_record(record["seq"], [image] if image else [],
                             [record["image_vector"]] if image else [], [record["caption"]],
                             [record["caption_vector"]])
    record.setdefault("spans", None)
    return record


# --- one write ------------------------------------------------------------------------------

def write(db_dir: Path, state: DbState, record: dict[str, Any],
          captions: list[dict[str, Any]]) -> DbState:
    """Journal, apply and commit `record`; returns the committed state. On an error
    nothing changed (or, if putting things back failed too, the next command
    completes the write). Call `finish` next, after adopting the new state."""
    journal = db_dir / WORK / JOURNAL
    journal_size = journal.stat().st_size if journal.exists() else 0
    undo: dict[str, bytes] = {}
    state = check_seals(db_dir, state) or state  # never build on a file changed meanwhile
    try:
        append(journal, journal_line(record))
        new = resealed(db_dir, state, apply(db_dir, state, record, captions, undo), record)
        write_bytes_atomic(db_dir / WORK / STATE, new.to_json(), sync_folder=False)  # commit
    except BaseException:
        with contextlib.suppress(Exception):
            _rollback(db_dir, state, record, captions, undo)
            truncate(journal, journal_size)
        raise
    settle(new)
    return new


def resealed(db_dir: Path, old: DbState, new: DbState,
             record: dict[str, Any] | None = None) -> DbState:
    """`new` with the seals of the JSON files `record` changed since `old` (all of
    them, re-read whole, without a record)."""
    seals = dict(old.seals)
    for name in FILES:
        changed: list[tuple[int, int]] | None = []
        if record is None or (record.get("replace") is not None and record["spans"] is None
                              and name in CAPTION_TEXT):
            changed = None  # rewritten whole
        elif new.bytes[name] != old.bytes[name]:  # appended over the closing bytes
            changed.append((old.bytes[name] - len(TAIL), new.bytes[name]))
        if record is not None and record.get("spans") and name in SLOT_FILES:
            start, length = record["spans"][SLOT_FILES.index(name)]
            changed.append((start, start + length))
        if changed != [] or name not in seals:
            seals[name] = seal(db_dir / name, seals.get(name), changed)
    return new.but(seals=seals)


def finish(db_dir: Path) -> None:
    """After a commit: make the rename durable, then empty the journal. The write is
    done either way; if this fails the journal stays (harmless: its record is
    committed) until the next write."""
    try:
        fsync_dir(db_dir / WORK)
        truncate(db_dir / WORK / JOURNAL, 0)
    except OSError as exc:
        log.warning("database %s: saved, but emptying its journal failed (%s); the next "
                    "write does it", db_dir, exc)


def apply(db_dir: Path, state: DbState, record: dict[str, Any], captions: list[dict[str, Any]],
          undo: dict[str, bytes]) -> DbState:
    """Write `record` into the files; returns the state that commits it. Bytes it
    overwrites go to `undo` first."""
    if "embed" in record:
        return _embed(db_dir, state, record)
    if record.get("replace") is None:
        return _append(db_dir, state, record)
    work, row = db_dir / WORK, record["replace"]
    vector = np.asarray(record["caption_vector"], np.float32)
    offset = row * state.caption_dim * 4
    undo[CAPTION_VECTORS] = _read(work / CAPTION_VECTORS, offset, vector.nbytes)
    if record["spans"] is not None:
        blobs = _replacement(record["caption"], vector)
        for name, (start, length) in zip(SLOT_FILES, record["spans"]):
            undo[name] = _read(db_dir / name, start, length)
        write_at(work / CAPTION_VECTORS, offset, vector.tobytes())
        for name, blob, (start, length) in zip(SLOT_FILES, blobs, record["spans"]):
            write_at(db_dir / name, start, blob.ljust(length))
        return state.but(seq=record["seq"], epoch=state.epoch + 1)
    write_at(work / CAPTION_VECTORS, offset, vector.tobytes())
    changed = list(captions)
    changed[row] = record["caption"]
    sizes = write_caption_files(db_dir, work, state, changed)
    return state.but(seq=record["seq"], epoch=state.epoch + 1, bytes={**state.bytes, **sizes})


def _append(db_dir: Path, state: DbState, record: dict[str, Any]) -> DbState:
    work, sizes = db_dir / WORK, dict(state.bytes)
    images, captions = record["images"], record["captions"]
    if images:
        vectors = np.asarray(record["image_vectors"], np.float32).reshape(len(images), -1)
        sizes[IMAGE_DB], _ = append_json(db_dir / IMAGE_DB, sizes[IMAGE_DB], state.images,
                                         [image_entry(i, v) for i, v in zip(images, vectors)])
        meta = f"{WORK}/{IMAGE_META}"
        sizes[meta] = write_at(work / IMAGE_META, sizes[meta],
                               b"".join(dumps(i) + b"\n" for i in images), end=True)
        write_at(work / IMAGE_VECTORS, state.vector_bytes()[IMAGE_VECTORS], vectors.tobytes(),
                 end=True)
    if captions:
        vectors = np.asarray(record["caption_vectors"], np.float32).reshape(len(captions), -1)
        entries = [caption_entry(c) for c in captions]
        sizes[CAPTION_DB], text = append_json(db_dir / CAPTION_DB, sizes[CAPTION_DB],
                                              state.captions, entries)
        sizes[CAPTION_EMBEDDING_DB], embedded = append_json(
            db_dir / CAPTION_EMBEDDING_DB, sizes[CAPTION_EMBEDDING_DB], state.embedded,
            [caption_vector_entry(c, v) for c, v in zip(captions, vectors)])
        meta = f"{WORK}/{CAPTION_META}"
        lines = np.cumsum([sizes[meta]] + [len(e) + 1 for e in entries])
        sizes[meta] = write_at(work / CAPTION_META, sizes[meta],
                               b"".join(e + b"\n" for e in entries), end=True)
        write_at(work / CAPTION_VECTORS, state.vector_bytes()[CAPTION_VECTORS], vectors.tobytes(),
                 end=True)
        slots = np.array([text, embedded, lines[:-1]], np.int64).T
        write_at(work / CAPTION_SLOTS, state.vector_bytes()[CAPTION_SLOTS],
                 np.ascontiguousarray(slots).tobytes(), end=True)
    return state.but(seq=record["seq"], images=state.images + len(images),
                     captions=state.captions + len(captions), bytes=sizes)


def _embed(db_dir: Path, state: DbState, record: dict[str, Any]) -> DbState:
    """First vectors of caption rows: their entries appended to caption_embeddings.json,
    their zero rows and slots filled in place (rows of unembedded captions, which no
    reader uses before the commit, so an undone write need not restore them)."""
    work, sizes = db_dir / WORK, dict(state.bytes)
    captions = record["captions"]
    vectors = np.asarray(record["caption_vectors"], np.float32).reshape(len(captions), -1)
    sizes[CAPTION_EMBEDDING_DB], starts = append_json(
        db_dir / CAPTION_EMBEDDING_DB, sizes[CAPTION_EMBEDDING_DB], state.embedded,
        [caption_vector_entry(c, v) for c, v in zip(captions, vectors)])
    width, done = 8 * len(SLOT_FILES), 0
    for start, end in record["embed"]:
        count = end - start
        write_at(work / CAPTION_VECTORS, start * state.caption_dim * 4,
                 vectors[done:done + count].tobytes())
        slots = np.frombuffer(_read(work / CAPTION_SLOTS, start * width, count * width),
                              np.int64).reshape(count, len(SLOT_FILES)).copy()
        slots[:, SLOT_FILES.index(CAPTION_EMBEDDING_DB)] = starts[done:done + count]
        write_at(work / CAPTION_SLOTS, start * width, slots.tobytes())
        done += count
    filled = {row for start, end in record["embed"] for row in range(start, end)}
    return state.but(seq=record["seq"], bytes=sizes,
                     unembedded=as_ranges(set(state.missing_rows()) - filled))


def _rollback(db_dir: Path, state: DbState, record: dict[str, Any],
              captions: list[dict[str, Any]], undo: dict[str, bytes]) -> None:
    """Put every file back as the last commit left it."""
    rewrite = record.get("replace") is not None and record["spans"] is None
    cut_to_state(db_dir, state, keep_captions=rewrite)
    work = db_dir / WORK
    if CAPTION_VECTORS in undo:
        write_at(work / CAPTION_VECTORS, record["replace"] * state.caption_dim * 4,
                 undo[CAPTION_VECTORS])
    if rewrite:
        write_caption_files(db_dir, work, state, captions)
    elif record.get("replace") is not None:
        for name, (start, _) in zip(SLOT_FILES, record["spans"]):
            if name in undo:
                write_at(db_dir / name, start, undo[name])


def recover(db_dir: Path) -> list[str]:
    """Finish or drop a write that a crash interrupted (call under the lock); returns
    what was done, for the user."""
    journal = db_dir / WORK / JOURNAL
    if not journal.exists() or journal.stat().st_size == 0:
        return []
    state = read_state(db_dir / WORK / STATE)
    records, torn = read_journal(journal)
    pending = next((r for r in records if r["seq"] == state.seq + 1), None)
    rewrite = pending is not None and pending.get("replace") is not None and \
        pending["spans"] is None
    cut_to_state(db_dir, state, keep_captions=rewrite)
    notes = ["dropped an experiment whose save was interrupted before it was acknowledged"] \
        if torn else []
    if pending is None:
        truncate(journal, 0)  # its write was committed, or never started
        return notes
    captions: list[dict[str, Any]] = []
    if rewrite:
        # The caption files may already be the rewritten ones (each renamed whole);
        # either version reads fine and re-applying the replacement gives the same.
        state = state.but(bytes={**state.bytes, **{
            name: (db_dir / name).stat().st_size for name in CAPTION_TEXT}})
        captions = new_rows(db_dir, None, state)[1]
    else:
        build_slots(db_dir, state)
    new = resealed(db_dir, state, apply(db_dir, state, pending, captions, {}))
    write_bytes_atomic(db_dir / WORK / STATE, new.to_json(), sync_folder=False)
    finish(db_dir)
    settle(new)
    if "embed" in pending:
        notes.append(f"completed the interrupted saving of {len(pending['captions'])} caption "
                     "vectors")
    elif pending.get("replace") is not None:
        notes.append(f"completed the interrupted save of {_which(pending['caption'])}: its "
                     "entries are all present now")
    elif len(pending["images"]) <= 1 and len(pending["captions"]) == 1:
        notes.append(f"completed the interrupted save of {_which(pending['captions'][0])}: "
                     "its three entries are all present now")
    else:
        notes.append(f"completed an interrupted batch of {len(pending['images'])} images and "
                     f"{len(pending['captions'])} captions: all its entries are present now")
    return notes


def _which(caption: dict[str, Any]) -> str:
    """A generated caption's image, for the user: "experiment 7 (x.jpg)" or "x.jpg"."""
    index = caption.get("experiment_index")
    return caption["image_id"] if index is None else f"experiment {index} ({caption['image_id']})"


def cut_to_state(db_dir: Path, state: DbState, keep_captions: bool = False) -> None:
    """Cut every appended file to its committed length (the caption files excepted
    while a rewrite of them is being finished)."""
    for name in IMAGE_TEXT + (() if keep_captions else CAPTION_TEXT):
        if name in FILES:
            cut_json(db_dir / name, state.bytes[name])
        else:
            truncate(db_dir / name, state.bytes[name])
    for name, size in state.vector_bytes().items():
        truncate(db_dir / WORK / name, size)


# --- the JSON files -------------------------------------------------------------------------

def append_json(path: Path, size: int, count: int, entries: list[bytes]) -> tuple[int, list[int]]:
    """Add entries to a database JSON file in place; returns its new size and where
    each entry starts."""
    start = size - len(TAIL)
    if _read(path, start, len(TAIL)) != TAIL:
        raise UserError(f"database file {path} does not end as expected; {REPAIR}")
    body, starts = bytearray(), []
    for n, entry in enumerate(entries):
        body += b",\n" if count + n else b"\n"
        starts.append(start + len(body))
        body += entry
    # Overwrite the closing bytes, never shorten first: a crash at any moment leaves
    # a file at least as long as the last commit, which recovery can cut back.
    return write_at(path, start, bytes(body + TAIL), end=True), starts


def cut_json(path: Path, size: int) -> None:
    """Back to the committed `size`: an append overwrote the closing bytes, so put them back."""
    actual = path.stat().st_size
    if actual == size and _read(path, size - len(TAIL), len(TAIL)) == TAIL:
        return
    if actual < size - len(TAIL):
        raise UserError(f"database file {path} is shorter than its last save; {REPAIR}")
    write_at(path, size - len(TAIL), TAIL, end=True)


def write_json_file(path: Path, header: dict[str, Any],
                    entries: Iterable[bytes]) -> tuple[int, list[int]]:
    """A database JSON file, one entry per line, written atomically; returns its
    size and where each entry starts."""
    starts: list[int] = []

    def chunks() -> Iterator[bytes]:
        head = json_head(header)
        position = len(head)
        yield head
        for n, entry in enumerate(entries):
            separator = b",\n" if n else b"\n"
            starts.append(position + len(separator))
            position += len(separator) + len(entry)
            yield separator + entry
        yield TAIL
    return write_bytes_atomic(path, chunks()), starts


def write_caption_files(json_dir: Path, work: Path, state: DbState,
                        captions: list[dict[str, Any]]) -> dict[str, int]:
    """The caption files and the slot table written whole, vectors from the working
    copy; returns the caption files' sizes."""
    vectors = map_vectors(work / CAPTION_VECTORS, len(captions), state.caption_dim)
    return write_caption_files_of(json_dir, work, state, captions, vectors)


def write_caption_files_of(json_dir: Path, work: Path, state: DbState,
                           captions: list[dict[str, Any]], vectors: np.ndarray) -> dict[str, int]:
    head = headers(state)
    entries = [caption_entry(c) for c in captions]
    text_size, text = write_json_file(json_dir / CAPTION_DB, head[CAPTION_DB], entries)
    has_vector = np.ones(len(captions), bool)
    has_vector[state.missing_rows()] = False
    embedded_size, embedded = write_json_file(
        json_dir / CAPTION_EMBEDDING_DB, head[CAPTION_EMBEDDING_DB],
        (caption_vector_entry(c, v) for c, v, keep in zip(captions, vectors, has_vector)
         if keep))
    column = np.full(len(captions), -1, np.int64)
    column[has_vector] = embedded
    lines = np.cumsum([0] + [len(e) + 1 for e in entries])[:-1]
    meta_size = write_bytes_atomic(work / CAPTION_META, b"".join(e + b"\n" for e in entries))
    slots = np.array([text, column, lines], np.int64).reshape(3, -1).T
    write_bytes_atomic(work / CAPTION_SLOTS, np.ascontiguousarray(slots).tobytes())
    return {CAPTION_DB: text_size, CAPTION_EMBEDDING_DB: embedded_size,
            f"{WORK}/{CAPTION_META}": meta_size}


def create(db_dir: Path, state: DbState, image_ids: list[str], kinds: list[str],
           image_vectors: np.ndarray, captions: list[dict[str, Any]],
           caption_vectors: np.ndarray) -> DbState:
    """Write a complete database (JSON files and working copy) in one commit.

    Everything is written into DB_DIR/.recap-new/ first; the JSON files are
    moved into place, then .recap-new is renamed to .recap, which commits it.
    """
    new = db_dir / NEW_WORK
    shutil.rmtree(new, ignore_errors=True)
    (new / "json").mkdir(parents=True)
    images = [{"image_id": i, "kind": k} for i, k in zip(image_ids, kinds)]
    sizes = {IMAGE_DB: write_json_file(new / "json" / IMAGE_DB, headers(state)[IMAGE_DB],
                                       (image_entry(i, v) for i, v in
                                        zip(images, image_vectors)))[0],
             f"{WORK}/{IMAGE_META}": write_bytes_atomic(
                 new / IMAGE_META, b"".join(dumps(i) + b"\n" for i in images))}
    write_bytes_atomic(new / IMAGE_VECTORS, image_vectors.tobytes())
    write_bytes_atomic(new / CAPTION_VECTORS, caption_vectors.tobytes())
    sizes.update(write_caption_files_of(new / "json", new, state, captions, caption_vectors))
    state = state.but(bytes=sizes)
    write_bytes_atomic(new / STATE, state.to_json())
    for name in FILES:
        move_into_place(new / "json" / name, db_dir / name)
    state = resealed(db_dir, state, state)
    write_bytes_atomic(new / STATE, state.to_json())
    (new / "json").rmdir()
    shutil.rmtree(db_dir / WORK, ignore_errors=True)
    move_into_place(new, db_dir / WORK)
    settle(state)
    return state


def clean_interrupted_create(db_dir: Path) -> list[str]:
    """A crash while creating a database: nothing was committed, so undo it."""
    new = db_dir / NEW_WORK
    try:
        origin = orjson.loads((new / STATE).read_bytes()).get("origin")
    except (OSError, orjson.JSONDecodeError):
        origin = None  # died before any JSON file was moved into place
    notes = []
    if origin == "seed":  # every JSON file in DB_DIR came from this first run
        for name in FILES:
            (db_dir / name).unlink(missing_ok=True)
        notes.append("removed a database left half-created by an interrupted first run")
    shutil.rmtree(new)
    return notes


# --- the slot table: where each caption row's entries are -----------------------------------

def build_slots(db_dir: Path, state: DbState, force: bool = False) -> None:
    """(Re)build caption_slots.i64 from the files if it is missing or the wrong size
    (a database written by an earlier version), or always with `force`."""
    path = db_dir / WORK / CAPTION_SLOTS
    if not force and path.exists() and path.stat().st_size == state.vector_bytes()[CAPTION_SLOTS]:
        return
    columns = {name: _line_starts(db_dir / name, count, name in FILES) for name, count in (
        (CAPTION_DB, state.captions), (CAPTION_EMBEDDING_DB, state.embedded),
        (f"{WORK}/{CAPTION_META}", state.captions))}
    # caption_embeddings.json lists captions by id, not always in captions.json's
    # order (human captions may get their vectors after generated ones): match by id.
    where = dict(zip(_entry_ids(db_dir / CAPTION_EMBEDDING_DB, columns[CAPTION_EMBEDDING_DB]),
                     columns[CAPTION_EMBEDDING_DB]))
    ids = [c["id"] for c in read_jsonl(db_dir / WORK / CAPTION_META, 0,
                                       state.bytes[f"{WORK}/{CAPTION_META}"])]
    columns[CAPTION_EMBEDDING_DB] = [where.get(i, -1) for i in ids]
    slots = np.array([columns[name] for name in SLOT_FILES], np.int64).reshape(
        len(SLOT_FILES), -1).T
    write_bytes_atomic(path, np.ascontiguousarray(slots).tobytes())


def _line_starts(path: Path, count: int, json_file: bool) -> list[int]:
    """Where the first `count` entries start: one per line, after the header line in
    a JSON file."""
    if count == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        starts: list[int] = []
        position = m.find(b"\n") + 1 if json_file else 0  # after the header line
        while len(starts) < count:
            if position >= len(m) or (position == 0 and (json_file or starts)):  # no more lines
                raise UserError(f"{path} holds fewer than its {count} entries; {REPAIR}")
            starts.append(position)
            position = m.find(b"\n", position) + 1
    return starts


def _entry_ids(path: Path, starts: list[int]) -> list[str]:
    """The "id" of the caption_embeddings.json entries starting at `starts`, read from
    each entry's first bytes ({"id":...,"image_id":...,"embedding":[...]})."""
    ids = []
    with open(path, "rb") as f:
        for start in starts:
            f.seek(start)
            head = f.read(4096)
            cut = head.find(b',"embedding"')
            entry = orjson.loads(head[:cut] + b"}" if cut > 0 else _line(path, start))
            ids.append(entry["id"])
    return ids


def _line(path: Path, start: int, limit: int | None = None) -> bytes:
    """The bytes from `start` to the end of its line (not past `limit`)."""
    with open(path, "rb") as f:
        f.seek(start)
        line = bytearray()
        while limit is None or start + len(line) < limit:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            end = chunk.find(b"\n")
            line += chunk if end < 0 else chunk[:end]
            if end >= 0:
                break
    return bytes(line if limit is None else line[:limit - start])


def _spans(db_dir: Path, state: DbState, row: int) -> list[tuple[int, int]]:
    """(start, length) of caption row `row`'s entry in each of SLOT_FILES: from where
    the slot table says it starts to its line's end (one entry per line; a JSON
    file's entries but the last end with a comma)."""
    width = 8 * len(SLOT_FILES)
    blob = _read(db_dir / WORK / CAPTION_SLOTS, row * width, width)
    if row >= state.captions or len(blob) != width:
        raise ValueError("slot table shorter than the captions")
    spans = []
    for name, start in zip(SLOT_FILES, np.frombuffer(blob, np.int64).tolist()):
        if start < 0:
            raise ValueError(f"caption row {row} has no entry in {name}")
        line = _line(db_dir / name, start, state.bytes[name])
        length = len(line) - (1 if name in FILES and line.endswith(b",") else 0)
        spans.append((start, length))
    return spans


def _holds(db_dir: Path, spans: list[tuple[int, int]], caption_id: str) -> bool:
    """Whether each span holds exactly one entry, of `caption_id`."""
    for name, (start, length) in zip(SLOT_FILES, spans):
        try:
            if length <= 0 or orjson.loads(_read(db_dir / name, start, length)).get(
                    "id") != caption_id:
                return False
        except (orjson.JSONDecodeError, AttributeError):
            return False
    return True


def _replacement(caption: dict[str, Any], vector: np.ndarray) -> list[bytes]:
    """A rerun's bytes for SLOT_FILES, without room after them."""
    entry = dumps(caption)
    return [entry, dumps({"id": caption["id"], "image_id": caption["image_id"],
                          "embedding": np.asarray(vector, np.float32)}), entry]


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, offset))
        return f.read(size)


__all__ = ["locked", "append_record", "embed_record", "replace_record", "write", "finish", "recover",
           "cut_to_state", "create", "resealed", "clean_interrupted_create", "write_json_file",
           "write_caption_files", "build_slots"]

"""Caption retrieval (RETRIEVE "captions"): `python main.py --retrieve captions`, with the
memory's captions, a corpus (--caption-datastore FILE) or the corpus alone
(--caption-datastore-only), and the CLIP text vectors kept in DB_DIR/clip_text_vectors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import caption_datastore
import config
import pipeline
from caption_datastore import CaptionDatastore, Entry, TextVectors, read_corpus
from errors import UserError
from fake_flickr import SUBJECTS, captions_for, image_name, make_image
from memory import Memory, initialize
from models import load_models
from retrieval import Neighbour, Selection, nearest_captions, retriever


# --- corpora ------------------------------------------------------------------------------

def test_a_corpus_of_each_format_gives_its_captions_and_where_each_is(tmp_path):
    (tmp_path / "c.txt").write_text("A dog runs .\n\n  a cat sleeps  \n")
    (tmp_path / "c.jsonl").write_text('{"caption": "A dog runs ."}\n\n{"caption": "a cat", '
                                      '"url": "x"}\n')
    (tmp_path / "c.csv").write_text('id,caption\n1,A dog runs .\n2,"a cat,\nasleep"\n3,a bird\n')
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["A dog runs .", "a cat"]}), tmp_path / "c.parquet")
    where = {name: [(c.text, c.line) for c in read_corpus(tmp_path / name)]
             for name in ("c.txt", "c.jsonl", "c.csv", "c.parquet")}
    assert where["c.txt"] == [("A dog runs .", 1), ("a cat sleeps", 3)]
    assert where["c.jsonl"] == [("A dog runs .", 1), ("a cat", 3)]
    assert where["c.csv"] == [("A dog runs .", 2), ("a cat,\nasleep", 3), ("a bird", 5)]
    assert where["c.parquet"] == [("A dog runs .", 1), ("a cat", 2)]
    line = read_corpus(tmp_path / "c.txt")[1]
    assert line.file == str(tmp_path / "c.txt") and line.key == f"corpus:{line.file}:3"


def test_a_corpus_that_cannot_be_read_is_one_clear_error(tmp_path):
    (tmp_path / "c.csv").write_text("id,text\n1,a dog\n")
    (tmp_path / "c.jsonl").write_text('{"caption": "a dog"}\nnot json\n')
    (tmp_path / "c.md").write_text("a dog\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    for name, message in (("c.csv", "no 'caption' column"), ("c.jsonl", "line 2: not JSON"),
                          ("c.md", "expected a .txt"), ("empty.txt", "no captions"),
                          ("missing.txt", "no such file")):
        with pytest.raises(UserError, match=message):
            read_corpus(tmp_path / name)
    with pytest.raises(UserError, match="--caption-datastore-only needs --caption-datastore"):
        config.resolve(caption_datastore_only=True)
    with pytest.raises(UserError, match="missing.txt: no such file"):
        config.resolve(caption_datastore=str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="expected a .txt"):
        config.resolve(caption_datastore=str(tmp_path / "c.md"))


def test_retrieve_is_a_result_changing_setting_with_two_values():
    assert {"RETRIEVE", "CAPTION_DATASTORE", "CAPTION_DATASTORE_ONLY",
            "CAPTION_DATASTORE_INDEX"} <= set(config.result_settings())
    assert config.resolve().retrieve == "images"
    assert config.resolve(retrieve="captions").retrieve == "captions"
    with pytest.raises(UserError, match="--retrieve must be images or captions"):
        config.resolve(retrieve="texts")


# --- retrieval over hand-made vectors: the guard and the selections --------------------------

def _unit(*rows):
    vectors = np.asarray(rows, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _store():
    """Captions of three memory images (the query's own, its near-twin's, another's) and
    a corpus, each caption's vector close to the query in the order listed."""
    entries = [Entry("query.jpg#0", "a dog runs on grass", image_id="query.jpg"),
               Entry("twin.jpg#0", "a dog running on the grass", image_id="twin.jpg"),
               Entry("other.jpg#0", "a brown dog outside", image_id="other.jpg"),
               Entry("corpus:c.txt:1", "A Dog runs  on grass .", file="c.txt", line=1),
               Entry("corpus:c.txt:2", "a puppy in a field", file="c.txt", line=2),
               Entry("corpus:c.txt:3", "a cat on a sofa", file="c.txt", line=3)]
    vectors = _unit([1, .00, 0], [1, .05, 0], [1, .10, 0], [1, .15, 0], [1, .2, .1], [0, 1, 1])
    memory = Memory.from_rows(["query.jpg", "twin.jpg", "other.jpg"],
                              _unit([1, 0, 0], [1, 0.02, 0], [0, 1, 0]),
                              [["a dog runs on grass"], ["a dog running on the grass"],
                               ["a brown dog outside"]])
    return CaptionDatastore(entries, vectors), memory


def test_the_guard_keeps_out_the_querys_own_its_twins_and_its_references_in_a_corpus():
    store, memory = _store()
    query = np.asarray([1, 0, 0], np.float32)
    refs = ["a dog runs on grass."]
    open_ = nearest_captions(store, memory, "query.jpg", query, Selection(5), refs)
    assert [n.captions[0] for n in open_.neighbours] == [
        "a dog running on the grass", "a brown dog outside", "A Dog runs  on grass .",
        "a puppy in a field", "a cat on a sofa"]          # never its own caption
    assert open_.identical_excluded == 0 and open_.per_neighbour == 1
    assert [(n.image_id, n.source) for n in open_.neighbours[:3]] == [
        ("twin.jpg", "memory"), ("other.jpg", "memory"), ("", "c.txt:1")]
    guarded = nearest_captions(store, memory, "query.jpg", query,
                               Selection(5, near_duplicate_threshold=0.95), refs)
    assert [n.captions[0] for n in guarded.neighbours] == [
        "a brown dog outside", "a puppy in a field", "a cat on a sofa"]
    assert guarded.identical_excluded == 1
    assert [n.rank for n in guarded.neighbours] == [1, 2, 3]
    scores = [n.score for n in guarded.neighbours]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(
        float(_unit([1, .10, 0])[0] @ query))


def test_every_selection_mode_works_on_caption_vectors():
    entries = [Entry(f"corpus:c.txt:{n}", f"caption {n}", file="c.txt", line=n)
               for n in range(1, 9)]
    # two near-identical captions first, then a spread
    vectors = _unit([1, 0, 0], [1, .01, 0], [1, .3, 0], [1, 0, .35], [1, .4, .4], [0, 1, 0],
                    [0, 0, 1], [0, 1, 1])
    store, memory = CaptionDatastore(entries, vectors), Memory.empty(3)
    query = np.asarray([1, 0, 0], np.float32)

    def lines(method, **kw):
        found = nearest_captions(store, memory, "q.jpg", query, Selection(3, method, **kw))
        return [int(n.source.split(":")[1]) for n in found.neighbours]
    assert lines("top") == [1, 2, 3]
    assert lines("dedup", dedup_threshold=0.99) == [1, 3, 4]     # one of the twins
    picked = lines("mmr", mmr_lambda=0.3)                  # the twin is all redundancy
    assert picked[0] == 1 and 2 not in picked and len(set(picked)) == 3
    drawn = lines("sample")
    assert len(set(drawn)) == 3 and set(drawn) <= {1, 2, 3, 4, 5, 6} and drawn == sorted(drawn)
    assert lines("sample") == drawn                                  # seeded by the image


def test_neighbour_records_stay_as_they_were_for_images():
    image = Neighbour(1, "a.jpg", 0.5, ("x", "y"))
    assert image.to_json() == {"rank": 1, "image_id": "a.jpg", "score": 0.5,
                               "captions": ["x", "y"]}
    assert Neighbour.from_json(image.to_json()) == image
    caption = Neighbour(2, "", 0.25, ("a cat",), "corpus.txt:7")
    assert caption.to_json()["source"] == "corpus.txt:7" and caption.label == "corpus.txt:7"
    assert Neighbour.from_json(json.loads(json.dumps(caption.to_json()))) == caption


# --- the text vectors: made once, a killed run resumed ------------------------------------

class _Counting:
    """An embedder that counts what it embeds and can fail after some calls."""

    def __init__(self, embedder, fail_after: int | None = None):
        self.embedder, self.fail_after, self.texts, self.calls = embedder, fail_after, [], 0
        self.key, self.name, self.dim = embedder.key, embedder.name, embedder.dim

    def embed_texts(self, texts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.texts += list(texts)
        return self.embedder.embed_texts(texts)


def test_a_killed_corpus_embedding_keeps_its_chunks_and_a_rerun_embeds_only_the_rest(
        tmp_path, tiny_clip, settings_kwargs):
    models = load_models(config.resolve(**{**settings_kwargs, "clip_model_name": tiny_clip}))
    clip = models.image_embedder
    texts = [f"{s} number {n} {a}" for n, (s, a) in enumerate(
        (s, a) for s in SUBJECTS for a in ("runs", "sits", "jumps", "swims"))]   # 40 texts
    killed = _Counting(clip, fail_after=2)      # killed in the third chunk of 16
    with pytest.raises(KeyboardInterrupt):
        TextVectors(killed, tmp_path / "db")(texts, chunk=16)
    folder = caption_datastore.vectors_folder(tmp_path / "db", clip.key)
    assert sorted(p.name for p in folder.iterdir()) == ["000000.json", "000000.npy",
                                                        "000001.json", "000001.npy"]
    rerun = _Counting(clip)
    resumed = TextVectors(rerun, tmp_path / "db")(texts, chunk=16)
    assert rerun.texts == texts[32:]                       # only what no chunk held
    whole = _Counting(clip)
    once = TextVectors(whole, tmp_path / "other")(texts, chunk=16)
    assert whole.texts == texts
    np.testing.assert_allclose(resumed, once, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(once, axis=1), 1, atol=1e-5)
    again = _Counting(clip)
    TextVectors(again, tmp_path / "db")(texts[::-1], chunk=16)
    assert again.texts == []                               # all kept: nothing embedded


# --- through the pipeline, with the fitted CLIP -------------------------------------------

@pytest.fixture
def caption_settings(settings_kwargs, fitted_clip):
    return {**settings_kwargs, "clip_model_name": fitted_clip, "retrieve": "captions"}


def _subject_hits(retrieve, memory, models, ids):
    """How many of the 16 fixture photos get a caption of their own subject first."""
    hits = 0
    for i in range(16):
        vector = models.image_embedder.embed([make_image(i)])[0]
        top = retrieve(memory, ids(i), vector).neighbours[0]
        hits += SUBJECTS[i % len(SUBJECTS)] in re.findall(r"\w+", top.captions[0])
    return hits


def test_retrieve_captions_finds_the_query_scenes_captions_in_the_memory(caption_settings):
    settings = config.resolve("batch", **caption_settings)
    dataset, db = initialize(settings)
    models = load_models(settings)
    memory = Memory.from_db(db, growing=False)
    retrieve = retriever(models)
    # chance: about 1 in 10 (ten subjects)
    assert _subject_hits(retrieve, memory, models, lambda i: f"copy-{i}.jpg") >= 8
    sample = dataset.train[0]
    context = retrieve(memory, sample.image_id, models.image_embedder.embed(
        [dataset.load_image(sample)])[0])
    assert len(context.neighbours) == settings.top_k_similar
    for n in context.neighbours:     # memory captions, never the query image's own
        assert n.source == "memory" and n.image_id != sample.image_id
        assert n.captions[0] in db.captions_of(n.image_id)
    folder = caption_datastore.vectors_folder(settings.db_dir, models.image_embedder.key)
    stored = sum(len(json.loads(p.read_text())["texts"]) for p in folder.glob("*.json"))
    assert stored == len({t for i in memory.ids for t in memory.captions_of(i)})


def test_a_corpus_alone_informs_the_captioner_with_no_images(caption_settings, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(captions_for(i)[0] for i in range(16)) + "\n")
    settings = config.resolve(**caption_settings, caption_datastore=str(corpus),
                              caption_datastore_only=True)
    models = load_models(settings)
    memory = Memory.empty(models.image_embedder.dim)
    retrieve = retriever(models)
    assert _subject_hits(retrieve, memory, models, lambda i: f"{i}.jpg") >= 8
    batch = pipeline.caption_batch(models, [("photo.jpg", make_image(3))], memory,
                                   embed_captions=False)
    record = batch.items[0]
    assert isinstance(record, pipeline.Captioned), record
    lines = corpus.read_text().splitlines()
    assert len(record.neighbours) == settings.top_k_similar
    for n in record.neighbours:
        path, line = n.source.rsplit(":", 1)
        assert n.image_id == "" and path == str(corpus) and lines[int(line) - 1] == \
            n.captions[0]
        assert f"- {n.captions[0]}" in record.prompt
    assert record.prompt_captions == tuple(n.captions[0] for n in record.neighbours)


def test_a_batch_run_retrieving_captions_records_them_and_what_the_guard_left_out(
        caption_settings, tmp_path):
    import batch_runner
    from models import load_dataset
    dataset = load_dataset(config.resolve(**caption_settings))
    reference = dataset.experiment_sample(0).captions[1]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"{reference.upper()}\n" + "\n".join(
        captions_for(i)[0] for i in range(16)) + "\n")
    # python main.py --indices 0-3 --retrieve captions --caption-datastore corpus.txt
    summary = batch_runner.run_batch([0, 1, 2, 3], "captions", **caption_settings,
                                     caption_datastore=str(corpus))
    assert summary["finished"] == 4 and summary["settings"]["retrieve"] == "captions"
    assert summary["identical_excluded"]["captions"] >= 1
    first = summary["items"][0]
    assert first["identical_excluded"] == 2     # its reference in capitals, and its first
    # caption among the corpus's first caption of every photo
    for item in summary["items"]:
        shown = [n["captions"][0] for n in item["similar_images"]]
        assert reference.upper() not in shown and len(shown) == 5
        for n in item["similar_images"]:
            assert n["source"] == "memory" or n["source"].startswith(f"{corpus}:")
            assert n["image_id"] != item["image_id"]
            assert f"- {n['captions'][0]}" in item["prompt"]
    csv = (tmp_path / "results" / "runs" / "captions" / "summary.csv").read_text()
    for n in first["similar_images"]:          # the neighbours column: where each came from
        assert f"{n['image_id'] or n['source']}:{n['score']:.4f}" in csv
    with pytest.raises(UserError, match="retrieve='captions', not 'images'"):
        batch_runner.run_batch([0], "captions", **{**caption_settings, "retrieve": "images"})

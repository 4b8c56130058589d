"""search.py: image and text search over the memory and over folders, on tiny models."""

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import config
import main
import search
from db_manager import FILES, DbManager, check_db
from errors import UserError
from fake_flickr import captions_for, image_name, make_image


@pytest.fixture
def memory(settings_kwargs):
    """A seeded pipeline memory with one experiment, and its data set."""
    dataset_loader, _ = main.initialize_system(**settings_kwargs)
    main.run_experiment(experiment_index=0, **settings_kwargs)
    return dataset_loader


@pytest.fixture
def photos(tmp_path):
    """A folder of 6 photos in two subfolders, plus a text file to ignore."""
    root = tmp_path / "photos"
    for i in range(6):
        folder = root / ("a" if i < 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        make_image(i).save(folder / f"p{i}.{'jpg' if i % 2 else 'png'}")
    (root / "notes.txt").write_text("not an image")
    return root


def cli(settings_kwargs, *args):
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()] + list(args)


def test_image_search_over_the_memory_finds_the_query_first(memory, settings_kwargs):
    sample = memory.train[3]
    result = search.search_images(sample.source, 3, **settings_kwargs)
    assert [h.rank for h in result.hits] == [1, 2, 3]
    assert result.hits[0].image_id == sample.image_id and result.hits[0].score > 0.999
    assert result.hits[0].path == sample.source
    assert result.indexed == len(memory.train) + 1           # training pool + the experiment
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)


def test_folder_search_is_recursive_and_incremental(photos, settings_kwargs, monkeypatch, caplog):
    first = search.search_images(str(photos / "b/c/p4.png"), 2, images_dir=str(photos),
                                 **settings_kwargs)
    assert first.hits[0].image_id == "b/c/p4.png" and first.indexed == 6
    assert first.index_update.startswith("0 unchanged, 6 new")
    import image_embedder
    calls = []    # images embedded, per call that embedded any
    real = image_embedder.ImageEmbedder.embed

    def counting(self, images, *args, **kwargs):
        vectors = real(self, images, *args, **kwargs)
        if len(vectors):
            calls.append(len(vectors))
        return vectors
    monkeypatch.setattr(image_embedder.ImageEmbedder, "embed", counting)
    again = search.search_images(str(photos / "a/p1.jpg"), 2, images_dir=str(photos),
                                 **settings_kwargs)
    assert again.index_update.startswith("6 unchanged, 0 new") and calls == [1]  # only the query

    make_image(40).save(photos / "a/p0.png")                  # changed
    (photos / "b/c/p5.jpg").unlink()                          # removed
    make_image(41).save(photos / "new.webp", "WEBP")          # added
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    calls.clear()
    third = search.search_images(str(photos / "new.webp"), 1, images_dir=str(photos),
                                 **settings_kwargs)
    assert third.index_update == "4 unchanged, 1 new, 1 changed, 1 removed, 1 unreadable"
    assert third.hits[0].image_id == "new.webp" and third.indexed == 6
    assert sum(calls) == 3                                    # p0, new.webp and the query
    assert "unreadable" in caplog.text
    calls.clear()
    fourth = search.search_images(str(photos / "new.webp"), 1, images_dir=str(photos),
                                  **settings_kwargs)
    assert fourth.index_update == "6 unchanged, 0 new, 0 changed, 0 removed, 1 unreadable"
    assert calls == [1]                                       # the broken file is not retried


@pytest.mark.parametrize("backbone", ["tiny_resnet", "tiny_dinov2", "tiny_siglip"])
def test_other_backbones_search_folders_and_the_memory(backbone, request, photos, memory,
                                                       settings_kwargs):
    model = request.getfixturevalue(backbone)
    folder = search.search_images(str(photos / "a/p2.png"), 2, images_dir=str(photos),
                                  backbone=model, **settings_kwargs)
    assert folder.hits[0].image_id == "a/p2.png" and folder.model == model
    sample = memory.train[1]
    db = search.search_images(sample.source, 2, backbone=model, **settings_kwargs)
    assert db.hits[0].image_id == sample.image_id and db.model == model
    assert db.index_update.startswith("0 unchanged")   # embedded with this backbone, cached
    cached = search.search_images(sample.source, 2, backbone=model, **settings_kwargs)
    assert cached.index_update.startswith(f"{db.indexed} unchanged, 0 new")


def test_faiss_index_gives_the_same_results(memory, settings_kwargs):
    pytest.importorskip("faiss")
    query = memory.train[5].source
    exact = search.search_images(query, 5, **settings_kwargs)
    flat = search.search_images(query, 5, index="faiss", **settings_kwargs)
    assert [h.image_id for h in exact.hits] == [h.image_id for h in flat.hits]


def test_every_search_backend_is_offered_on_the_command_line():
    import similarity_search
    assert search.INDEX_BACKENDS == similarity_search.BACKENDS


@pytest.mark.parametrize("backend", ["ivfpq", "hnsw"])
def test_ann_index_finds_the_query_image_itself(memory, settings_kwargs, backend):
    pytest.importorskip("faiss")
    query = memory.train[5]
    found = search.search_images(query.source, 3, index=backend, **settings_kwargs)
    assert found.hits[0].image_id == query.image_id


def test_text_search_ranks_the_matching_image_first(memory, settings_kwargs):
    cats = {image_name(i) for i in range(16) if "cat" in captions_for(i)[0]}
    result = search.search_text("a cat", 3, **settings_kwargs)
    assert result.hits[0].image_id in cats
    assert "cat" in result.hits[0].caption.lower() and result.hits[0].caption_source == "human"
    assert len({h.image_id for h in result.hits}) == 3        # one row per image
    generated = main.run_experiment(experiment_index=1, **settings_kwargs)
    hit = search.search_text(generated["generated_caption"], 1, **settings_kwargs).hits[0]
    assert hit.image_id == generated["image_id"] and hit.caption_source == "generated"
    assert hit.caption_model == settings_kwargs["vlm_model_name"]


def test_caption_folder_makes_a_folder_searchable_by_words(photos, settings_kwargs):
    summary = main.caption_folder(str(photos), retrieval=False, **settings_kwargs)
    assert summary["captioned"] == 6 and summary["failed"] == []
    again = main.caption_folder(str(photos), retrieval=False, **settings_kwargs)
    assert again["captioned"] == 0 and again["already_captioned"] == 6   # resumable
    from db_manager import DbManager
    from folder_index import folder_db_dir
    db = DbManager.open(folder_db_dir(settings_kwargs["db_dir"], photos))
    caption = db.captions_of("b/c/p3.jpg")[0]
    result = search.search_text(caption, 1, images_dir=str(photos), **settings_kwargs)
    hit = result.hits[0]
    assert result.by == "captions" and hit.found_by == "captions"   # the default: it has some
    assert hit.image_id == "b/c/p3.jpg" and hit.caption_source == "generated"
    assert hit.path == str(photos / "b/c/p3.jpg")
    # the folder's captions never enter the experiment memory
    assert not Path(settings_kwargs["db_dir"], "captions.json").exists()


def test_caption_folder_prints_each_caption_and_writes_captions_csv(photos, settings_kwargs,
                                                                   capsys):
    # python main.py --caption-folder photos/
    assert main.main(cli(settings_kwargs, "--caption-folder", str(photos),
                         "--no-retrieval")) == 0
    out = capsys.readouterr().out.splitlines()
    from folder_index import folder_db_dir
    db_dir = folder_db_dir(settings_kwargs["db_dir"], photos)
    captions = {c["image_id"]: c for c in
                json.loads((db_dir / "captions.json").read_text())["entries"]}
    assert len(captions) == 6
    for image_id, entry in captions.items():   # each image on its line, with its caption
        assert any(line.split() == [image_id] + entry["caption"].split() for line in out)
        assert "experiment_index" not in entry  # folder images are no experiments
    with open(db_dir / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["image_id"]: r["caption"] for r in rows} == {
        i: c["caption"] for i, c in captions.items()}
    assert {r["model"] for r in rows} == {settings_kwargs["vlm_model_name"]}
    assert str(db_dir / "captions.csv") in out[-2]
    # a rerun captions nothing new: no caption lines, the table still lists all six
    (photos / "a" / "new.png").write_bytes((photos / "a" / "p0.png").read_bytes())
    assert main.main(cli(settings_kwargs, "--caption-folder", str(photos), "--no-retrieval",
                         "--quiet")) == 0
    out, err = capsys.readouterr()
    assert "a/new.png" not in out and out.startswith("captioned 1 of 7 images")
    bar = err.rstrip().split("\r")[-1]      # the bar counts this run's image, shows the rest
    assert "100%" in bar and "1/1" in bar and "done_before=6" in bar, bar
    with open(db_dir / "captions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 7


def test_caption_folder_with_retrieval_uses_the_memory(photos, memory, settings_kwargs):
    summary = main.caption_folder(str(photos), retrieval=True, **settings_kwargs)
    assert summary["captioned"] == 6 and summary["retrieval"]


def test_cli_table_figure_and_json(memory, settings_kwargs, tmp_path, capsys):
    query = memory.train[0].source
    assert search.main(cli(settings_kwargs, "--query", query, "--topk", "3",
                           "--plot", str(tmp_path / "fig.png"))) == 0
    out = capsys.readouterr().out
    assert "rank" in out and query in out and f"figure: {tmp_path / 'fig.png'}" in out
    figure = (tmp_path / "fig.png").read_bytes()
    assert figure.startswith(b"\x89PNG") and len(figure) > 5000
    assert search.main(cli(settings_kwargs, "--text", "a dog", "--topk", "2", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "text" and data["query"] == "a dog" and len(data["hits"]) == 2
    assert set(data["hits"][0]) == {"rank", "image_id", "score", "path", "caption",
                                    "caption_source", "caption_model", "found_by", "ranks"}
    assert data["by"] == "captions" and data["hits"][0]["found_by"] == "captions"
    assert Path(data["figure"]).parent == Path(settings_kwargs["results_dir"])


@pytest.mark.parametrize("args, code, message", [
    (["--query", "/nonexistent.jpg"], 1, "image not found: /nonexistent.jpg"),
    (["--query", "{notes}"], 1, "could not be read"),
    (["--query", "{img}", "--topk", "0"], 2, "--topk must be a positive integer, got 0"),
    (["--query", "{img}", "--topk", "-3"], 2, "--topk must be a positive integer, got -3"),
    (["--query", "{img}", "--topk", "abc"], 2, "--topk must be a positive integer, got 'abc'"),
    (["--query", "{img}", "--images-dir", "{empty}"], 1, "no images in"),
    (["--text", "x", "--images-dir", "{photos}", "--text-by", "captions"], 1,
     "has no captions yet: run `python main.py --caption-folder"),
    (["--text", "x", "--text-by", "words"], 2, "argument --text-by: invalid choice: 'words'"),
    (["--text", "  "], 2, "--text is empty"),
    (["--text", ""], 2, "--text is empty"),
    ([], 2, "give --query IMAGE or --text TEXT"),
    (["--query", "{img}", "--text", "x"], 2, "not allowed with argument"),
    (["--query", "{img}", "--backbone", "/nonexistent/model"], 1,
     "image model '/nonexistent/model': no such file or directory (set --backbone"),
])
def test_bad_input_is_one_line(args, code, message, photos, settings_kwargs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    values = {"notes": photos / "notes.txt", "img": photos / "a/p0.png", "empty": tmp_path / "empty",
              "photos": photos}
    args = [a.format(**values) for a in args]
    if "--images-dir" not in args and "--query" in args:
        args += ["--images-dir", str(photos)]
    assert search.main(cli(settings_kwargs, *args)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], err


def test_a_topk_larger_than_the_collection_returns_all_of_it(photos, settings_kwargs, capsys):
    # python search.py --query photos/a/p0.png --images-dir photos/ --topk 50   (6 photos)
    assert search.main(cli(settings_kwargs, "--query", str(photos / "a/p0.png"),
                           "--images-dir", str(photos), "--topk", "50")) == 0
    out = capsys.readouterr().out
    assert "note: top 50 asked, only 6 images searched: showing all 6" in out
    result = search.search_images(str(photos / "a/p0.png"), 50, images_dir=str(photos),
                                  **settings_kwargs)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5, 6] and len(result.notes) == 1
    text = search.search_text("a photo", 9, images_dir=str(photos), **settings_kwargs)
    assert len(text.hits) == 6 and "showing all 6" in text.notes[0]
    exact = search.search_images(str(photos / "a/p0.png"), 6, images_dir=str(photos),
                                 **settings_kwargs)
    assert len(exact.hits) == 6 and exact.notes == []


def test_search_without_a_memory_says_how_to_make_one(settings_kwargs, photos):
    with pytest.raises(UserError, match="run `python main.py` first"):
        search.search_images(str(photos / "a/p0.png"), 1, **settings_kwargs)


def test_images_saved_from_the_web_page_are_found_and_drawn(memory, settings_kwargs, tmp_path):
    import app
    import config
    upload = tmp_path / "upload.png"
    make_image(77).save(upload)
    saved = app.caption_tab(str(upload), save_to_memory=True,
                            settings=config.resolve(**settings_kwargs))
    result = search.search_images(str(upload), 2, **settings_kwargs)
    assert result.hits[0].image_id == saved["image_id"] and result.hits[0].path
    figure = search.plot_results(result, tmp_path / "fig.png")
    assert figure.stat().st_size > 1000


def test_caption_folder_counts_unreadable_images_and_batches(photos, settings_kwargs):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    summary = main.caption_folder(str(photos), retrieval=False,
                                  **{**settings_kwargs, "batch_size": 4})
    assert summary["captioned"] == 6 and summary["failed"] == ["broken.jpg"]
    single = main.caption_folder(str(photos), retrieval=False, **{
        **settings_kwargs, "batch_size": 1, "db_dir": settings_kwargs["db_dir"] + "-single"})
    from db_manager import DbManager
    from folder_index import folder_db_dir
    batched, one = (DbManager.open(folder_db_dir(d, photos)) for d in (
        settings_kwargs["db_dir"], settings_kwargs["db_dir"] + "-single"))
    assert single["captioned"] == 6
    assert {c.image_id: c.caption for c in batched.entries()} == {
        c.image_id: c.caption for c in one.entries()}          # batched == unbatched


def test_a_memory_describes_itself_to_search(memory, settings_kwargs, tmp_path, capsys,
                                             monkeypatch):
    # built from a local data set and tiny models; search is given only --db-dir
    monkeypatch.chdir(tmp_path)
    only = ["--db-dir", settings_kwargs["db_dir"], "--results-dir", str(tmp_path / "r"),
            "--device", "cpu"]
    assert search.main(only + ["--text", "a dog", "--topk", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["model"] == settings_kwargs["caption_embedding_model"] and found["hits"]
    assert search.main(only + ["--query", memory.train[2].source, "--topk", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["image_id"] == memory.train[2].image_id


def test_searching_with_another_model_than_the_database_is_one_line(memory, settings_kwargs,
                                                                      tiny_siglip, capsys):
    args = cli({**settings_kwargs, "clip_model_name": tiny_siglip}, "--query",
               memory.train[0].source)
    assert search.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and settings_kwargs["clip_model_name"] in err
    assert tiny_siglip in err


def test_captioning_a_folder_again_with_other_settings_is_refused(photos, settings_kwargs):
    main.caption_folder(str(photos), retrieval=False, **settings_kwargs)
    with pytest.raises(UserError, match="was captioned with max_new_tokens=8, not 12"):
        main.caption_folder(str(photos), retrieval=False,
                            **{**settings_kwargs, "max_new_tokens": 12})
    with pytest.raises(UserError, match="was captioned with retrieval=False, not True"):
        main.caption_folder(str(photos), retrieval=True, **settings_kwargs)


# --- text search with CLIP's text tower, and queries in other languages -------------------

KOREAN = "밝은 빨간색 미니 원피스"   # "a bright red mini dress" (seed 003's queries)


@pytest.fixture
def clip_memory(settings_kwargs, fitted_clip):
    """A memory built with the fitted tiny CLIP (no experiment run), and its settings."""
    kwargs = {**settings_kwargs, "clip_model_name": fitted_clip}
    dataset, _ = main.initialize_system(**kwargs)
    return dataset, kwargs


def test_clip_finds_a_photo_of_an_uncaptioned_folder_from_its_caption(tmp_path, fitted_clip,
                                                                      settings_kwargs):
    shots = tmp_path / "shots"
    shots.mkdir()
    for i in range(16):
        make_image(i).save(shots / f"{i:02d}.png")
    kwargs = {**settings_kwargs, "clip_model_name": fitted_clip}
    for i in (3, 11):
        result = search.search_text(captions_for(i)[0], 2, images_dir=str(shots), **kwargs)
        assert result.by == "clip" and result.model == fitted_clip and result.indexed == 16
        top = result.hits[0]
        assert top.image_id == f"{i:02d}.png" and top.path == str(shots / f"{i:02d}.png")
        assert top.found_by == "clip" and top.ranks == {"clip": 1} and top.caption is None
    with pytest.raises(UserError, match="has no captions yet.* or search with --text-by clip"):
        search.search_text("a dog", 1, images_dir=str(shots), by="captions", **kwargs)


def test_text_search_of_the_memory_by_captions_clip_or_both(clip_memory):
    dataset, kwargs = clip_memory
    sample = dataset.train[4]
    text = captions_for([image_name(i) for i in range(16)].index(sample.image_id))[0]
    clip = search.search_text(text, 3, by="clip", **kwargs)
    assert clip.hits[0].image_id == sample.image_id and clip.hits[0].found_by == "clip"
    captions = search.search_text(text, 3, **kwargs)        # the default: the memory has captions
    assert captions.by == "captions" and captions.hits[0].image_id == sample.image_id
    assert captions.hits[0].caption == text and captions.hits[0].score > 0.999
    both = search.search_text(text, 4, by="both", **kwargs)
    assert both.model == f"{kwargs['caption_embedding_model']} + {kwargs['clip_model_name']}"
    top = both.hits[0]
    assert top.image_id == sample.image_id and top.found_by == "captions+clip"
    assert top.ranks == {"captions": 1, "clip": 1} and top.caption == text
    for hit in both.hits:        # reciprocal-rank fusion of the two full rankings
        assert hit.score == pytest.approx(sum(1 / (search.RRF_K + r) for r in hit.ranks.values()),
                                          abs=1e-6)
    assert [h.score for h in both.hits] == sorted((h.score for h in both.hits), reverse=True)
    assert both.indexed == len(dataset.train)


def test_text_search_shows_the_top_of_the_full_ranking(clip_memory):
    dataset, kwargs = clip_memory
    text = captions_for(7)[0]
    for by in ("captions", "clip"):
        everything = search.search_text(text, len(dataset.train), by=by, **kwargs)
        assert len(everything.hits) == everything.indexed == len(dataset.train)
        for k in (1, 3, 5):
            top = search.search_text(text, k, by=by, **kwargs)
            assert top.indexed == everything.indexed
            assert [(h.image_id, h.score, h.caption) for h in top.hits] == [
                (h.image_id, h.score, h.caption) for h in everything.hits[:k]]


@pytest.mark.parametrize("by", ["captions", "clip", "both"])
def test_text_search_with_faiss_finds_what_numpy_finds(clip_memory, capsys, tmp_path,
                                                       monkeypatch, by):
    faiss = pytest.importorskip("faiss")
    dataset, kwargs = clip_memory
    text = captions_for(9)[0]
    flat_indexes, real = [], faiss.IndexFlatIP
    monkeypatch.setattr(faiss, "IndexFlatIP", lambda dim: flat_indexes.append(dim) or real(dim))
    runs, built = {}, {}
    for index in ("numpy", "faiss"):
        flat_indexes.clear()
        assert search.main(cli(kwargs, "--text", text, "--text-by", by, "--topk", "5",
                               "--index", index, "--json", "--plot",
                               str(tmp_path / f"{index}.png"))) == 0
        runs[index], built[index] = json.loads(capsys.readouterr().out), len(flat_indexes)
    assert built == {"numpy": 0, "faiss": 2 if by == "both" else 1}  # one index per ranking
    numpy_hits, faiss_hits = runs["numpy"]["hits"], runs["faiss"]["hits"]
    assert len(numpy_hits) == 5 and runs["faiss"]["indexed"] == runs["numpy"]["indexed"]
    assert [(h["image_id"], h["caption"], h["ranks"]) for h in faiss_hits] == [
        (h["image_id"], h["caption"], h["ranks"]) for h in numpy_hits]
    assert [h["score"] for h in faiss_hits] == pytest.approx([h["score"] for h in numpy_hits],
                                                             abs=1e-6)


@pytest.mark.parametrize("backend", ["faiss-fp16", "ivfpq", "hnsw"])
def test_text_search_reaches_every_index_backend(clip_memory, backend):
    pytest.importorskip("faiss")
    dataset, kwargs = clip_memory
    sample = dataset.train[4]
    text = captions_for([image_name(i) for i in range(16)].index(sample.image_id))[0]
    for by in ("captions", "clip"):
        found = search.search_text(text, 3, by=by, index=backend, **kwargs)
        assert found.hits[0].image_id == sample.image_id and len(found.hits) == 3


def test_a_korean_query_works_end_to_end(clip_memory, tmp_path, capsys, monkeypatch, recwarn):
    dataset, kwargs = clip_memory
    figure = tmp_path / "ko.png"
    assert search.main(cli(kwargs, "--text", KOREAN, "--text-by", "both", "--json",
                           "--plot", str(figure))) == 0
    out = capsys.readouterr().out
    assert KOREAN in out                                       # readable, not \\u escapes
    data = json.loads(out)
    assert data["query"] == KOREAN and len(data["hits"]) == 5 and data["by"] == "both"
    # all-MiniLM-L6-v2 is English: the result says so
    assert any("unknown to the caption model" in note for note in data["notes"])
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert not [w for w in recwarn if "Glyph" in str(w.message)]  # one log line, not one per glyph
    assert search.main(cli(kwargs, "--text", KOREAN, "--plot", str(figure))) == 0
    table = capsys.readouterr().out
    assert f"text search by captions for {KOREAN!r}" in table and "note: " in table
    # a terminal that cannot show Hangul gets escapes, not an error
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert search.main(cli(kwargs, "--text", KOREAN, "--plot", str(figure))) == 0
    sys.stdout.flush()
    assert "\\ubc1d\\uc740".encode() in raw.getvalue()
    monkeypatch.undo()
    import app
    import config
    page = app.search_text_tab(KOREAN, 3, config.resolve(**kwargs), by="clip")
    assert page["by"] == "clip" and [row[5] for row in page["rows"]] == ["clip"] * 3
    assert page["hits"][0][1].startswith("#1 · ") and "clip" in page["hits"][0][1]


# --- the memory's human captions get their vectors at the first text search ---------------

def counting_caption_embeddings(monkeypatch) -> list[str]:
    """The texts CaptionEmbedder.embed_captions is asked for from now on."""
    import caption_embedder
    embedded: list[str] = []
    real = caption_embedder.CaptionEmbedder.embed_captions

    def counting(self, captions, progress=False):
        embedded.extend(captions)
        return real(self, captions, progress)
    monkeypatch.setattr(caption_embedder.CaptionEmbedder, "embed_captions", counting)
    return embedded


def built_the_old_way(db, db_dir, settings_kwargs):
    """A copy of memory `db` made as before lazy caption vectors: every human caption
    embedded by the seed, then the same experiments."""
    import config
    from models import load_models
    from db_manager import DbIdentity, DbManager
    s = db.describe()
    old = DbManager.open(db_dir, DbIdentity(s.clip_model, s.caption_model, s.dataset, s.split,
                                            s.random_seed, s.experiment_samples, *s.prompts))
    embedder = load_models(config.resolve(**settings_kwargs)).caption_embedder
    train = db.image_rows("train")
    human = [e.to_dict() for e in db.entries() if e.source == "human"]
    old.seed(list(train.ids), train.vectors, human,
             embedder.embed_captions([c["caption"] for c in human]))
    vectors = db.caption_rows().vectors
    for e in db.entries():
        if e.source == "generated":
            old.add_experiment(e.image_id, db.image_vector(e.image_id), e.caption,
                               vectors[e.row], e.model, e.experiment_index, e.timestamp)
    return old


def hits_of(result):
    return [(h.image_id, h.caption, round(h.score, 4)) for h in result.hits]


def test_the_first_text_search_embeds_the_human_captions_once(settings_kwargs, monkeypatch,
                                                              caplog, tmp_path):
    embedded = counting_caption_embeddings(monkeypatch)
    dataset, db = main.initialize_system(**settings_kwargs)
    main.run_experiment(experiment_index=0, **settings_kwargs)
    humans = 5 * len(dataset.train)
    assert len(embedded) == 1                          # the generated caption alone
    assert len(db.missing_caption_rows()) == humans

    caplog.set_level("INFO")
    first = search.search_text("a dog runs", 5, by="captions", **settings_kwargs)
    assert len(embedded) == 1 + humans and f"embedding {humans} captions of the memory " \
        "once" in caplog.text and "have no vectors yet" in caplog.text and \
        f"embedded {humans} captions in" in caplog.text
    again = search.search_text("a dog runs", 5, by="captions", **settings_kwargs)
    assert len(embedded) == 1 + humans and hits_of(again) == hits_of(first)

    old = built_the_old_way(db, tmp_path / "old", settings_kwargs)
    assert np.allclose(old.caption_rows().vectors, DbManager.open(db.db_dir).caption_rows().vectors,
                       atol=1e-5)
    before = {f: (old.db_dir / f).read_bytes() for f in FILES}
    count = len(embedded)
    same = search.search_text("a dog runs", 5, by="captions",
                              **{**settings_kwargs, "db_dir": str(old.db_dir)})
    assert hits_of(same) == hits_of(first)
    # a database built with every caption embedded is used as it is
    assert len(embedded) == count and before == {f: (old.db_dir / f).read_bytes() for f in FILES}
    assert check_db(db.db_dir) == [] and check_db(old.db_dir) == []


KILLED_SEARCH = """
import time
import caption_embedder, memory, search
memory.EMBED_CHUNK = 8
real = caption_embedder.CaptionEmbedder.embed_captions

def slow(self, captions, progress=False):
    time.sleep(0.5)
    return real(self, captions, progress)
caption_embedder.CaptionEmbedder.embed_captions = slow
search.main(["--text", "a dog", "--text-by", "captions"])
"""


def test_a_search_killed_while_embedding_keeps_what_it_saved_and_the_next_finishes(
        settings_kwargs, pipeline_env, monkeypatch):
    import signal
    import subprocess
    import time

    import db_format
    dataset, db = main.initialize_system(**settings_kwargs)
    main.run_experiment(experiment_index=0, **settings_kwargs)
    state = db.db_dir / db_format.WORK / db_format.STATE
    child = subprocess.Popen([sys.executable, "-c", KILLED_SEARCH], env=pipeline_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while db_format.read_state(state).embedded < 1 + 8 and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    left = DbManager.open(db.db_dir).missing_caption_rows()
    assert 0 < len(left) < 5 * len(dataset.train)        # killed part-way, the chunks kept

    embedded = counting_caption_embeddings(monkeypatch)
    result = search.search_text("a dog", 5, by="captions", **settings_kwargs)
    assert len(embedded) == len(left) and result.hits       # only what was missing
    finished = DbManager.open(db.db_dir)
    assert finished.missing_caption_rows() == [] and check_db(db.db_dir) == []
    human = [e for e in finished.entries() if e.source == "human"]
    from models import load_models
    fresh = load_models(config.resolve(**settings_kwargs)).caption_embedder.embed_captions(
        [e.caption for e in human])
    assert np.allclose(finished.caption_rows().vectors[[e.row for e in human]], fresh,
                       atol=1e-5)


def test_text_search_of_the_caption_datastore_by_clip(clip_memory, tmp_path):
    dataset, kwargs = clip_memory
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"caption": "a red kite over the sea"}\n')
    # python search.py --text "a red kite over the sea" --text-by clip-captions \
    #     --caption-datastore corpus.jsonl
    result = search.search_text("a red kite over the sea", 3, by="clip-captions",
                                caption_datastore=str(corpus), **kwargs)
    assert result.by == "clip-captions" and result.model == kwargs["clip_model_name"]
    top = result.hits[0]
    assert (top.image_id, top.caption, top.caption_source, top.path) == (
        f"{corpus}:1", "a red kite over the sea", "corpus", None)
    assert top.score == pytest.approx(1.0, abs=1e-5)
    assert result.indexed == 1 + sum(len(dataset.get(s.image_id).captions)
                                     for s in dataset.train)
    memory_hit = result.hits[1]
    assert memory_hit.caption_source == "memory" and memory_hit.path is not None
    assert memory_hit.caption in dataset.get(memory_hit.image_id).captions
    table = search.format_table(result)
    assert f"{corpus}:1" in table and "corpus: a red kite over the sea" in table


@pytest.mark.parametrize("mode", ["image", "text"])
def test_the_figure_titles_never_cover_an_image_or_a_caption(mode, monkeypatch, tmp_path):
    # python search.py ... --plot fig.png: the query, then each hit titled with its score
    from figure_checks import overlaps, saved_figures
    figures = saved_figures(monkeypatch)
    query = tmp_path / "query.png"
    make_image(5).save(query)
    hits = [search.Hit(rank, f"10{rank}_a_long_flickr_style_file_name.jpg", 0.9 - rank / 50,
                       caption="A dog, seen from far away, runs through the long grass of a "
                               "field near the river .", caption_source="human",
                       found_by="captions+clip")
            for rank in range(1, 6)]
    result = search.SearchResult(mode, str(query) if mode == "image" else
                                 "a dog running through the grass by the river", "memory",
                                 "model", hits, 12, by="both",
                                 _load=lambda hit: make_image(hit.rank))
    search.plot_results(result, tmp_path / "fig.png")
    assert overlaps(figures[-1]) == []

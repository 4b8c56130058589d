"""pipeline.py: the one caption step, the memory view, the models of a process, and the
settings a database records."""

import logging
import pickle

import numpy as np
import pytest

import config
import main
import pipeline
from memory import Memory, caption_vector_lookup
from models import load_dataset, load_models
from retrieval import nearest
from db_manager import DbManager
from errors import UserError
from fake_flickr import make_image
from similarity_search import top_k


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# --- Memory ------------------------------------------------------------------------------

def test_a_frozen_memory_searches_its_rows_like_top_k():
    vectors = unit(np.random.default_rng(0).normal(size=(20, 8)))
    ids = [f"i{n}" for n in range(20)]
    memory = Memory(ids, vectors, lambda i: [f"caption of {i}"])
    query = vectors[3]
    assert memory.search(query, 5, exclude=("i3",)) == top_k(query, vectors, ids, 5,
                                                             exclude={"i3"})
    assert nearest(memory, "i3", query, 2).neighbours[0].captions == (
        f"caption of {memory.search(query, 1, exclude=('i3',))[0].image_id}",)


def test_rows_added_to_a_memory_are_found_and_replace_their_old_row():
    vectors = unit(np.eye(4))
    memory = Memory(["a", "b", "c", "d"], vectors, lambda i: [f"human {i}"],
                             growing=True)
    memory.add("new", unit([[1, 0.01, 0, 0]])[0], "a generated caption")
    hits = memory.search(vectors[0], 2)
    assert [h.image_id for h in hits] == ["a", "new"] and len(memory) == 5
    assert memory.captions_of("new") == ["a generated caption"]
    memory.add("b", vectors[0], "b again")            # a rerun: the row is replaced
    assert len(memory) == 5 and memory.ids.count("b") == 1
    assert [h.image_id for h in memory.search(vectors[1], 4)][-1] != "b"
    memory.remove("b")                                # its caption failed: the old row is back
    assert memory.captions_of("b") == ["human b"]
    np.testing.assert_array_equal(memory.vectors[memory.ids.index("b")], vectors[1])


def test_ties_between_old_and_added_rows_go_to_the_older_row():
    memory = Memory(["old"], unit([[1, 0]]), lambda i: [])
    memory.add("added", unit([[1, 0]])[0], "x")
    assert [h.image_id for h in memory.search(unit([[1, 0]])[0], 2)] == ["old", "added"]


# --- the caption step ------------------------------------------------------------------

@pytest.fixture
def models(settings_kwargs):
    return load_models(config.resolve(**settings_kwargs))


def test_one_unreadable_image_fails_alone_and_the_rest_are_captioned(models):
    def broken():
        raise UserError("image broken.jpg could not be read: not an image")
    memory = Memory.empty(models.image_embedder.dim)
    batch = pipeline.caption_batch(models, [("a.jpg", make_image(1)), ("broken.jpg", broken),
                                            ("c.jpg", make_image(3))], memory)
    a, failed, c = batch.items
    assert isinstance(failed, pipeline.Failure) and failed.stage == "load_image"
    assert "could not be read" in failed.error and failed.to_json()["image_id"] == "broken.jpg"
    for record in (a, c):
        assert isinstance(record, pipeline.Captioned) and record.caption
        assert record.prompt == models.settings.prompt_template_no_context   # empty memory
        assert record.caption_vector.shape == (models.caption_embedder.dim,)
        assert abs(float(np.linalg.norm(record.vector)) - 1) < 1e-4
    assert batch.generate_calls == 1 and {"embed_image", "generate"} <= set(batch.seconds)


def test_a_growing_memory_batch_captions_each_image_after_the_ones_it_retrieves(models):
    # three copies of one picture: each retrieves the copies captioned before it
    image = make_image(5)
    memory = Memory.empty(models.image_embedder.dim)
    memory.growing = True
    batch = pipeline.caption_batch(models, [(f"copy{n}", image) for n in range(3)], memory)
    first, second, third = batch.items
    assert first.neighbours == ()
    assert [n.image_id for n in second.neighbours] == ["copy0"]
    assert [n.image_id for n in third.neighbours] == ["copy0", "copy1"]
    assert second.neighbours[0].captions == (first.caption,)
    assert batch.generate_calls == 3 and memory.added == {"copy0", "copy1", "copy2"}


def test_embeddings_given_skip_the_image_model_and_no_caption_vectors_on_request(
        models, monkeypatch):
    vector = models.image_embedder.embed([make_image(2)])[0]
    monkeypatch.setattr(type(models.image_embedder), "embed",
                        lambda *a, **k: pytest.fail("embedded again"))
    [record] = pipeline.caption_batch(models, [("x", make_image(2))], Memory.empty(),
                                      vectors=[vector], embed_captions=False).items
    assert record.caption and record.caption_vector is None
    np.testing.assert_array_equal(record.vector, vector)


# --- settings --------------------------------------------------------------------------

def test_python_main_py_resolves_its_settings_once(settings_kwargs, monkeypatch):
    calls = []
    real = config.resolve

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(config, "resolve", counting)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings_kwargs.items()]
    assert main.main(args + ["--experiment-image-index", "1"]) == 0
    assert len(calls) == 1


def test_settings_survive_pickling_for_ray_actors():
    settings = config.resolve(top_k_similar=3)
    again = pickle.loads(pickle.dumps(settings))
    assert again == settings and again.given == {"TOP_K_SIMILAR"} and again.top_k_similar == 3


def test_the_result_changing_settings_include_precision_kernel_and_memory():
    names = config.result_settings()
    assert {"DTYPE", "VLM_ATTN_IMPLEMENTATION", "MEMORY", "CLIP_MODEL_NAME", "TOP_K_SIMILAR",
            "PROMPT_TEMPLATE", "MAX_NEW_TOKENS", "VLM_IMAGE_SPLITTING"} <= set(names)
    assert not {"DEVICE", "BATCH_SIZE", "DB_DIR", "LOG_LEVEL"} & set(names)


def test_a_database_fills_in_the_models_and_data_set_it_was_built_with(settings_kwargs, caplog):
    main.initialize_system(**settings_kwargs)
    db = DbManager.open(settings_kwargs["db_dir"])
    with caplog.at_level(logging.INFO, logger="config"):
        filled = config.resolve("search", db_dir=settings_kwargs["db_dir"])
    assert filled.clip_model_name == settings_kwargs["clip_model_name"]
    assert filled.caption_embedding_model == settings_kwargs["caption_embedding_model"]
    assert filled.experiment_samples == settings_kwargs["experiment_samples"]
    assert load_dataset(filled).fingerprint == db.describe().split
    assert "using the database's settings: clip_model_name=" in caplog.text
    with pytest.raises(UserError, match="was built with CLIP model .*, not 'other/clip'"):
        config.resolve(db_dir=settings_kwargs["db_dir"], clip_model_name="other/clip")


# --- the caption model's prompts ----------------------------------------------------------

def _cli(kwargs, *args):
    return [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()] + list(args)


def test_captions_carry_the_document_prompt_and_queries_the_query_prompt(
        settings_kwargs, prompt_minilm, minilm):
    import search
    from caption_embedder import CaptionEmbedder
    from conftest import DOCUMENT_PROMPT, QUERY_PROMPT
    kwargs = {**settings_kwargs, "caption_embedding_model": prompt_minilm}
    _, db = main.initialize_system(**kwargs)
    assert db.describe().prompts == (QUERY_PROMPT, DOCUMENT_PROMPT)     # recorded
    plain = CaptionEmbedder(minilm)          # the same model without prompts: add them by hand
    hit = search.search_text("a dog in the snow", 1, **kwargs).hits[0]  # embeds the captions
    db = DbManager.open(kwargs["db_dir"])
    first = next(db.entries()).caption
    vectors = db.caption_rows().vectors
    np.testing.assert_allclose(vectors[0],
                               plain.embed_captions([DOCUMENT_PROMPT + first])[0], atol=1e-5)
    query = plain.embed_captions([QUERY_PROMPT + "a dog in the snow"])[0]
    row = next(c.row for c in db.entries() if c.caption == hit.caption)
    assert hit.score == pytest.approx(float(query @ vectors[row]), abs=1e-5)
    generated = main.run_experiment(experiment_index=0, **kwargs)   # the one caption step
    stored = DbManager.open(kwargs["db_dir"]).caption_rows().vectors[-1]
    np.testing.assert_allclose(stored, plain.embed_captions(
        [DOCUMENT_PROMPT + generated["generated_caption"]])[0], atol=1e-5)


def test_a_database_built_with_other_prompts_is_refused(settings_kwargs, prompt_minilm, capsys):
    import search
    kwargs = {**settings_kwargs, "caption_embedding_model": prompt_minilm}
    main.initialize_system(**kwargs)
    with pytest.raises(UserError, match="built with the caption model's query prompt "
                                        "'task: search result \\| query: ', not 'other: '"):
        search.search_text("a dog", 1, caption_query_prompt="other: ", **kwargs)
    with pytest.raises(UserError, match="document \\(caption\\) prompt 'title: none \\| text: ', "
                                        "not ''"):
        main.initialize_system(**{**kwargs, "caption_document_prompt": ""})
    capsys.readouterr()
    assert search.main(_cli(kwargs, "--text", "a dog", "--caption-query-prompt", "other: ")) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--caption-query-prompt 'task: search" in errors[0]
    assert "Traceback" not in err


def test_a_caption_model_whose_prompts_changed_embeds_as_the_database_did(
        settings_kwargs, prompt_minilm, pipeline_env, tmp_path, run_main):
    import json
    import shutil
    model = tmp_path / "model"
    shutil.copytree(prompt_minilm, model)
    kwargs = {**settings_kwargs, "caption_embedding_model": str(model)}
    main.initialize_system(**kwargs)
    config_file = model / "config_sentence_transformers.json"   # the model is updated
    saved = json.loads(config_file.read_text())
    saved["prompts"]["document"] = "passage: "
    config_file.write_text(json.dumps(saved))
    env = {**pipeline_env, "RECAP_CAPTION_EMBEDDING_MODEL": str(model)}

    def search(*more):                  # python search.py --text "a dog" ...
        return run_main(["--text", "a dog", *more], env, "search")
    out = search()                      # "auto": the prompts the database recorded
    assert out.returncode == 0, out.stderr
    assert "using the database's settings: " in out.stderr and \
        "caption_document_prompt='title: none | text: '" in out.stderr
    out = search("--caption-document-prompt", "passage: ")     # named: refused, one line
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert ("was built with the caption model's document (caption) prompt 'title: none | "
            "text: ', not 'passage: '") in out.stderr


def test_a_database_made_before_prompts_were_recorded_keeps_working(settings_kwargs,
                                                                    prompt_minilm, minilm):
    import json
    import shutil
    from pathlib import Path

    import search
    from caption_embedder import CaptionEmbedder
    from conftest import QUERY_PROMPT
    from db_manager import CAPTION_EMBEDDING_DB, WORK
    kwargs = {**settings_kwargs, "caption_embedding_model": prompt_minilm,
              "caption_document_prompt": ""}
    main.initialize_system(**kwargs)          # captions without a prompt, as before
    db_dir = Path(kwargs["db_dir"] + "-old")  # and the files as an older version wrote them
    shutil.copytree(kwargs["db_dir"], db_dir)
    kwargs["db_dir"] = str(db_dir)
    shutil.rmtree(db_dir / WORK)
    header = json.loads((db_dir / CAPTION_EMBEDDING_DB).read_text())
    del header["query_prompt"], header["document_prompt"]
    (db_dir / CAPTION_EMBEDDING_DB).write_text(json.dumps(header))
    del kwargs["caption_document_prompt"]
    assert DbManager.open(db_dir).describe().prompts is None
    filled = config.resolve("search", **kwargs)
    assert filled.caption_document_prompt == ""                    # as they were embedded
    plain = CaptionEmbedder(minilm)
    hit = search.search_text("a dog in the snow", 1, **kwargs).hits[0]
    db = DbManager.open(db_dir)
    row = next(c.row for c in db.entries() if c.caption == hit.caption)
    query = plain.embed_captions([QUERY_PROMPT + "a dog in the snow"])[0]   # the model's, as then
    assert hit.score == pytest.approx(float(query @ db.caption_rows().vectors[row]), abs=1e-5)
    # main.py embeds new captions as the database did; naming another prompt is one line
    from conftest import DOCUMENT_PROMPT
    with pytest.raises(UserError, match="built before caption prompts were recorded, with no "
                                        "document \\(caption\\) prompt, not 'title: none"):
        main.initialize_system(**kwargs, caption_document_prompt=DOCUMENT_PROMPT)
    assert main.main(_cli(kwargs, "--experiment-image-index", "1")) == 0
    db = DbManager.open(db_dir)
    last = list(db.entries())[-1]
    np.testing.assert_allclose(db.caption_rows().vectors[last.row], plain.embed_captions(
        [last.caption])[0], atol=1e-5)


def test_dedup_selection_gives_the_memorys_captions_their_vectors_first(settings_kwargs):
    _, lazy = main.initialize_system(**settings_kwargs)
    assert lazy.missing_caption_rows()                    # a first run embeds none of them
    _, db = main.initialize_system(**{**settings_kwargs, "neighbour_selection": "dedup"})
    assert db.missing_caption_rows() == []                # "dedup" compares them
    lookup = caption_vector_lookup(db)
    assert lookup(next(db.entries()).image_id) is not None

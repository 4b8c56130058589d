"""pipeline.py: the one caption step, the memory view, the models of a process, and the
settings a database records."""

import pickle

import numpy as np
import pytest

import config
import main
import pipeline
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
    memory = pipeline.Memory(ids, vectors, lambda i: [f"caption of {i}"])
    query = vectors[3]
    assert memory.search(query, 5, exclude=("i3",)) == top_k(query, vectors, ids, 5,
                                                             exclude={"i3"})
    assert pipeline.nearest(memory, "i3", query, 2).neighbours[0].captions == (
        f"caption of {memory.search(query, 1, exclude=('i3',))[0].image_id}",)


def test_rows_added_to_a_memory_are_found_and_replace_their_old_row():
    vectors = unit(np.eye(4))
    memory = pipeline.Memory(["a", "b", "c", "d"], vectors, lambda i: [f"human {i}"],
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
    memory = pipeline.Memory(["old"], unit([[1, 0]]), lambda i: [])
    memory.add("added", unit([[1, 0]])[0], "x")
    assert [h.image_id for h in memory.search(unit([[1, 0]])[0], 2)] == ["old", "added"]


# --- the caption step ------------------------------------------------------------------

@pytest.fixture
def models(settings_kwargs):
    return pipeline.load_models(config.resolve(**settings_kwargs))


def test_one_unreadable_image_fails_alone_and_the_rest_are_captioned(models):
    def broken():
        raise UserError("image broken.jpg could not be read: not an image")
    memory = pipeline.Memory.empty(models.image_embedder.dim)
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
    memory = pipeline.Memory.empty(models.image_embedder.dim)
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
    [record] = pipeline.caption_batch(models, [("x", make_image(2))], pipeline.Memory.empty(),
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


def test_a_database_fills_in_the_models_and_data_set_it_was_built_with(settings_kwargs):
    main.initialize_system(**settings_kwargs)
    db = DbManager.open(settings_kwargs["db_dir"])
    bare = config.resolve(db_dir=settings_kwargs["db_dir"])
    filled = pipeline.for_database(bare, db)
    assert filled.clip_model_name == settings_kwargs["clip_model_name"]
    assert filled.caption_embedding_model == settings_kwargs["caption_embedding_model"]
    assert filled.experiment_samples == settings_kwargs["experiment_samples"]
    assert pipeline.load_dataset(filled).fingerprint == db.state.split
    with pytest.raises(UserError, match="was built with CLIP model .*, not 'other/clip'"):
        pipeline.for_database(bare.replace(clip_model_name="other/clip"), db)

"""neighbour_selection.py and retrieval.nearest's selections, on hand-made vectors: four
scenes, each photographed several times (views = the scene's direction plus a little
noise), so which scene a neighbour shows is known."""

import numpy as np
import pytest

import config
from memory import Memory
from retrieval import Selection, nearest
from errors import UserError
import neighbour_selection as ns


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def scenes_memory(views=(4, 3, 3, 3), seed=0):
    """Scene s's views are ids "s<s>v<v>" (cosine ~0.95 to one another); the query is a
    fresh view of scene 0 that also resembles the other scenes a little (~0.4)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(len(views), 32)))
    ids, rows = [], []
    for s, count in enumerate(views):
        for v in range(count):
            ids.append(f"s{s}v{v}")
            rows.append(unit(centres[s] + 0.04 * rng.normal(size=32)))
    query = unit(centres[0] + 0.45 * centres[1:].sum(axis=0) + 0.04 * rng.normal(size=32))
    memory = Memory(ids, np.stack(rows), lambda i: [f"a photo of scene {i[1]}"])
    return memory, query


def scene(image_id: str) -> str:
    return image_id.split("v")[0]


def neighbours(memory, query, **selection):
    select = Selection(**{"k": 3, **selection})
    return [n.image_id for n in nearest(memory, "query", query, select).neighbours]


def test_top_returns_views_of_the_querys_own_scene():
    memory, query = scenes_memory()
    found = neighbours(memory, query)
    assert [scene(i) for i in found] == ["s0", "s0", "s0"]
    assert found == [h.image_id for h in memory.search(query, 3)]     # today's behaviour
    assert neighbours(memory, query) == [n.image_id for n in nearest(
        memory, "query", query, 3).neighbours]                          # an int k is "top"


def test_mmr_and_dedup_return_more_distinct_scenes_than_top():
    memory, query = scenes_memory()
    top = neighbours(memory, query)
    mmr = neighbours(memory, query, method="mmr", mmr_lambda=0.5)
    dedup = neighbours(memory, query, method="dedup", dedup_threshold=0.9)
    assert len({scene(i) for i in top}) == 1
    assert len({scene(i) for i in mmr}) == 3 and mmr[0] == top[0]      # most similar first
    assert len({scene(i) for i in dedup}) == 3 and dedup[0] == top[0]


def test_mmr_with_weight_one_is_top_and_scores_stay_the_cosine_to_the_query():
    memory, query = scenes_memory()
    assert neighbours(memory, query, method="mmr", mmr_lambda=1.0) == neighbours(memory, query)
    context = nearest(memory, "query", query, Selection(3, "mmr"))
    vectors = memory.vectors_of([n.image_id for n in context.neighbours])
    assert [n.rank for n in context.neighbours] == [1, 2, 3]
    np.testing.assert_allclose([n.score for n in context.neighbours], vectors @ query,
                               rtol=1e-5)


def test_the_guard_excludes_every_view_of_the_querys_scene():
    memory, query = scenes_memory(views=(6, 2, 2, 2))
    closest_other = max(float(memory.vectors_of([i])[0] @ query)
                        for i in memory.ids if scene(i) != "s0")
    own = min(float(memory.vectors_of([i])[0] @ query) for i in memory.ids if scene(i) == "s0")
    threshold = (closest_other + own) / 2
    for method in ns.SELECTIONS:
        found = neighbours(memory, query, method=method, near_duplicate_threshold=threshold)
        assert len(found) == 3 and "s0" not in {scene(i) for i in found}, method
    # off (0): the views are back
    assert scene(neighbours(memory, query, near_duplicate_threshold=0.0)[0]) == "s0"


def test_dedup_skips_a_neighbour_whose_captions_repeat_a_chosen_ones():
    # two images that look different but whose captions say the same thing
    images = unit([[1, 0, 0], [0.8, 0.6, 0], [0.8, 0, 0.6]])
    captions = unit([[1, 0], [1, 0.01], [0, 1]])
    assert ns.dedup(images, 2, 0.9) == [0, 1]
    assert ns.dedup(images, 2, 0.9, captions) == [0, 2]
    unknown = captions.copy()
    unknown[1] = np.nan                                  # no caption vector: by image only
    assert ns.dedup(images, 2, 0.9, unknown) == [0, 1]


def test_dedup_reads_the_memorys_caption_vectors():
    images = unit([[1, 0, 0], [0.8, 0.6, 0], [0.8, 0, 0.6]])
    by_id = dict(zip("abc", unit([[1, 0], [1, 0.01], [0, 1]])))
    memory = Memory(list("abc"), images, lambda i: [i], caption_vector_of=by_id.get)
    found = nearest(memory, "q", images[0], Selection(
        2, "dedup", dedup_threshold=0.9)).neighbours
    assert [n.image_id for n in found] == ["a", "c"]


def test_sample_draws_k_of_the_2k_nearest_the_same_way_every_time():
    memory, query = scenes_memory(views=(5, 5, 5, 5))
    nearest_ten = [h.image_id for h in memory.search(query, 10)]
    first = neighbours(memory, query, k=5, method="sample", seed=7)
    assert first == neighbours(memory, query, k=5, method="sample", seed=7)
    assert set(first) <= set(nearest_ten) and len(set(first)) == 5
    assert first == sorted(first, key=nearest_ten.index)                 # similarity order
    draws = {tuple(neighbours(memory, query, k=5, method="sample", seed=s)) for s in range(8)}
    assert len(draws) > 1


def test_a_memory_smaller_than_k_gives_what_it_has():
    memory, query = scenes_memory(views=(1, 1))
    for method in ns.SELECTIONS:
        assert len(neighbours(memory, query, k=5, method=method)) == 2


def test_selection_of_the_settings():
    settings = config.resolve(neighbour_selection="mmr", top_k_similar=4)
    one, batch = Selection.of(settings), Selection.of(settings.in_context("batch"))
    assert (one.method, one.k, one.mmr_lambda) == ("mmr", 4, settings.mmr_lambda)
    assert one.near_duplicate_threshold == 0.0 and batch.near_duplicate_threshold == 0.95
    fixed = config.resolve(near_duplicate_threshold=0.9)
    assert Selection.of(fixed).near_duplicate_threshold == 0.9
    assert config.resolve(env={"RECAP_NEAR_DUPLICATE_THRESHOLD": "0"}).near_duplicate_threshold \
        == 0.0


@pytest.mark.parametrize("overrides, message", [
    ({"neighbour_selection": "diverse"}, "--neighbour-selection must be top, mmr, dedup or sample"),
    ({"mmr_lambda": 1.5}, "--mmr-lambda must be between 0 and 1"),
    ({"dedup_threshold": -0.1}, "--dedup-threshold must be between 0 and 1"),
    ({"near_duplicate_threshold": "high"}, "--near-duplicate-threshold must be auto or a cosine"),
    ({"near_duplicate_threshold": 2}, "--near-duplicate-threshold must be auto or a cosine"),
])
def test_bad_selection_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        config.resolve(**overrides)


# --- the math alone -----------------------------------------------------------------------

def test_near_duplicate_pairs_give_each_querys_best_twin_above_the_threshold():
    pool = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    queries = unit([[1, 0.05, 0], [0, 0.7, 0.7], [0.02, 0, 1]])
    pairs = ns.near_duplicate_pairs(queries, pool, 0.99)
    assert [(q, p) for q, p, _ in pairs] == [(0, 0), (2, 2)]
    assert pairs[0][2] == pytest.approx(float(queries[0] @ pool[0]))
    assert ns.near_duplicate_pairs(queries[:0], pool, 0.9) == []


def test_scene_count_joins_chains_of_near_duplicates():
    a = unit([[1, 0, 0], [0.96, 0.28, 0], [0.85, 0.53, 0], [0, 0, 1]])
    # a0-a1 and a1-a2 are above 0.95, a0-a2 is not: one scene by the chain; a3 another
    assert ns.scene_count(a, 0.95) == 2
    assert ns.scene_count(a, 0.999) == 4 and ns.scene_count(a[:0], 0.9) == 0


def test_distinct_words():
    # a, dog, runs, jumps, dog's, toy: case and punctuation do not make new words
    assert ns.distinct_words(["A dog runs.", "a DOG jumps", "dog's toy"]) == 6
    assert ns.distinct_words([]) == 0

"""Exact cosine top-k against a brute-force reference."""

import numpy as np
import pytest

from similarity_search import Neighbour, top_k


def unit(rows, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(query, vectors, ids, k, exclude=()):
    scored = [(-float(v @ query), i) for i, v in enumerate(vectors) if ids[i] not in exclude]
    return [ids[i] for _, i in sorted(scored)[:k]]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    vectors = unit(200, seed=seed)
    ids = [f"img{i}" for i in range(200)]
    query = unit(1, seed=100 + seed)[0]
    got = top_k(query, vectors, ids, 7)
    assert [n.image_id for n in got] == brute_force(query, vectors, ids, 7)
    assert [n.rank for n in got] == list(range(1, 8))
    scores = [n.score for n in got]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(vectors[int(got[0].image_id[3:])] @ query), abs=1e-6)


def test_query_image_is_never_returned():
    vectors = unit(20)
    ids = [f"img{i}" for i in range(20)]
    got = top_k(vectors[3], vectors, ids, 5, exclude={"img3"})
    assert "img3" not in [n.image_id for n in got]
    assert [n.image_id for n in got] == brute_force(vectors[3], vectors, ids, 5, {"img3"})


def test_ties_are_broken_by_row_order():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], dtype=np.float32)
    ids = ["e", "d", "c", "b", "a"]
    got = top_k(np.array([1, 0], dtype=np.float32), vectors, ids, 2)
    assert [n.image_id for n in got] == ["e", "c"]
    again = top_k(np.array([1, 0], dtype=np.float32), vectors, ids, 4)
    assert [n.image_id for n in again] == ["e", "c", "b", "a"]


def test_k_larger_than_the_pool_returns_everything_else():
    vectors = unit(4)
    ids = list("abcd")
    got = top_k(vectors[0], vectors, ids, 10, exclude={"a"})
    assert sorted(n.image_id for n in got) == ["b", "c", "d"]


def test_k_zero_and_empty_pool():
    assert top_k(unit(1)[0], unit(3), list("abc"), 0) == []
    assert top_k(unit(1)[0], np.zeros((0, 8), np.float32), [], 5) == []


def test_dimension_and_id_mismatches_are_errors():
    with pytest.raises(ValueError):
        top_k(unit(1, dim=4)[0], unit(3), list("abc"), 2)
    with pytest.raises(ValueError):
        top_k(unit(1)[0], unit(3), list("ab"), 2)


def test_returns_neighbour_records():
    got = top_k(unit(1)[0], unit(3), list("abc"), 1)
    assert isinstance(got[0], Neighbour) and isinstance(got[0].score, float)


# --- SearchIndex ------------------------------------------------------------------

from similarity_search import SearchIndex  # noqa: E402


def test_index_batch_search_equals_top_k_per_query():
    vectors, ids = unit(300, seed=1), [f"img{i}" for i in range(300)]
    index = SearchIndex(8)
    index.add(ids[:100], vectors[:100])
    index.add(ids[100:], vectors[100:])                 # added in two chunks
    queries = unit(20, seed=2)
    excludes = [{f"img{q}"} for q in range(20)]
    got = index.search(queries, 5, exclude=excludes)
    want = [top_k(q, vectors, ids, 5, ex) for q, ex in zip(queries, excludes)]
    assert [[n.image_id for n in r] for r in got] == [[n.image_id for n in r] for r in want]
    for g, w in zip(got, want):    # a matrix product may differ from a vector product in the last bit
        np.testing.assert_allclose([n.score for n in g], [n.score for n in w], atol=1e-6)
    assert [n.image_id for n in index.search(queries[0], 5)[0]] == [
        n.image_id for n in top_k(queries[0], vectors, ids, 5)]


def test_faiss_returns_the_same_top_k_as_numpy():
    pytest.importorskip("faiss")
    vectors, ids = unit(2000, dim=32, seed=3), [f"img{i}" for i in range(2000)]
    exact = SearchIndex.from_vectors(ids, vectors)
    flat = SearchIndex.from_vectors(ids, vectors, backend="faiss")
    queries = np.concatenate([unit(30, dim=32, seed=4), vectors[:10]])
    excludes = [set()] * 30 + [{f"img{i}"} for i in range(10)]
    a, b = exact.search(queries, 7, excludes), flat.search(queries, 7, excludes)
    assert [[n.image_id for n in r] for r in a] == [[n.image_id for n in r] for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_allclose([n.score for n in ra], [n.score for n in rb], atol=1e-6)


def test_faiss_settles_ties_like_numpy():
    pytest.importorskip("faiss")
    vectors = np.array([[1, 0]] * 30 + [[0, 1]] * 5, dtype=np.float32)
    ids = [f"r{i}" for i in range(35)]
    for backend in ("numpy", "faiss"):
        got = SearchIndex.from_vectors(ids, vectors, backend).search(np.array([1, 0]), 3,
                                                                      [{"r0"}])[0]
        assert [n.image_id for n in got] == ["r1", "r2", "r3"], backend


def test_index_save_and_load_round_trip(tmp_path):
    vectors, ids = unit(50, seed=5), [f"img{i}" for i in range(50)]
    SearchIndex.from_vectors(ids, vectors).save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    assert loaded.ids == ids and isinstance(loaded.vectors, np.memmap)
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert loaded.search(vectors[3], 1)[0][0].image_id == "img3"


def test_index_rejects_wrong_shapes_and_backends():
    index = SearchIndex(8)
    with pytest.raises(ValueError):
        index.add(["a"], unit(1, dim=4))
    with pytest.raises(ValueError):
        index.add(["a", "b"], unit(1))
    with pytest.raises(ValueError):
        SearchIndex(8, backend="annoy")
    index.add(["a"], unit(1))
    with pytest.raises(ValueError):
        index.search(unit(1, dim=4), 1)
    assert index.search(unit(2), 0) == [[], []]


def test_faiss_fp16_agrees_with_exact_search():
    pytest.importorskip("faiss")
    vectors, ids = unit(3000, dim=64, seed=7), [f"img{i}" for i in range(3000)]
    exact = SearchIndex.from_vectors(ids, vectors)
    half = SearchIndex.from_vectors(ids, vectors, backend="faiss-fp16")
    queries = unit(50, dim=64, seed=8)
    a, b = exact.search(queries, 5), half.search(queries, 5)
    agree = np.mean([len({n.image_id for n in x} & {n.image_id for n in y}) / 5
                     for x, y in zip(a, b)])
    assert agree >= 0.98
    for x, y in zip(a, b):
        np.testing.assert_allclose([n.score for n in x][:1], [n.score for n in y][:1], atol=2e-3)
    assert half.search(vectors[17], 1, [set()])[0][0].image_id == "img17"

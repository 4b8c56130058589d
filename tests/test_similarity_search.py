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

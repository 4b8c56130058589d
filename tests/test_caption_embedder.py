"""CaptionEmbedder with the real all-MiniLM-L6-v2, and the query-instruction rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from caption_embedder import BGE_QUERY_INSTRUCTION, CaptionEmbedder, query_instruction
from errors import UserError

CAPTIONS = ["A dog runs across the grass.", "A puppy is running on a lawn.",
            "A plate of pasta sits on a wooden table."]


@pytest.fixture(scope="module")
def embedder(minilm) -> CaptionEmbedder:
    return CaptionEmbedder(minilm, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def vectors(embedder) -> np.ndarray:
    return embedder.embed_captions(CAPTIONS)


def test_embed_captions_returns_float32_rows_of_384(vectors):
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)


def test_dim_is_384(embedder):
    assert embedder.dim == 384


def test_embed_captions_rows_are_unit_norm(vectors):
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_captions(vectors):
    dog, puppy, pasta = vectors
    assert dog @ puppy > dog @ pasta + 0.2
    assert dog @ puppy > puppy @ pasta + 0.2


def test_embeddings_do_not_depend_on_batch_size(minilm, vectors):
    single = CaptionEmbedder(minilm, device="cpu", batch_size=1).embed_captions(CAPTIONS)
    np.testing.assert_allclose(single, vectors, atol=1e-5)


def test_empty_caption_list_gives_an_empty_384_array(embedder):
    got = embedder.embed_captions([])
    assert got.shape == (0, 384) and got.dtype == np.float32


def test_empty_query_list_gives_an_empty_384_array(embedder):
    assert embedder.embed_queries([]).shape == (0, 384)


def test_accepts_a_pathlib_path(minilm, vectors):
    embedder = CaptionEmbedder(Path(minilm), device="cpu")
    assert embedder.name == minilm
    np.testing.assert_allclose(embedder.embed_captions(CAPTIONS), vectors, atol=1e-5)


def test_accepts_a_loaded_sentence_transformer(minilm, vectors):
    embedder = CaptionEmbedder(SentenceTransformer(minilm, device="cpu"), name="minilm")
    assert embedder.name == "minilm"
    np.testing.assert_allclose(embedder.embed_captions(CAPTIONS), vectors, atol=1e-5)


def test_rejects_a_model_that_is_not_a_sentence_transformer():
    with pytest.raises(UserError, match="SentenceTransformer"):
        CaptionEmbedder(object())


# ------------------------------------------------------------------------- query instruction
@pytest.mark.parametrize("name", ["BAAI/bge-base-en-v1.5", "BAAI/bge-small-en-v1.5",
                                  "BAAI/bge-large-en-v1.5"])
def test_bge_english_models_get_the_bge_query_instruction(name):
    assert query_instruction(name, None) == BGE_QUERY_INSTRUCTION
    assert query_instruction(name, {"query": "", "document": ""}) == BGE_QUERY_INSTRUCTION


@pytest.mark.parametrize("name", ["BAAI/bge-m3", "BAAI/bge-base-zh-v1.5",
                                  "sentence-transformers/all-MiniLM-L6-v2"])
def test_other_models_get_no_query_instruction(name):
    assert query_instruction(name, None) == ""


def test_a_model_query_prompt_wins_over_the_name():
    prompts = {"query": "query: ", "document": "passage: "}
    assert query_instruction("intfloat/e5-small-v2", prompts) == "query: "
    assert query_instruction("BAAI/bge-base-en-v1.5", prompts) == "query: "


def test_minilm_has_no_query_prefix(embedder):
    assert embedder.query_prefix == ""


def test_loaded_model_with_a_query_prompt_uses_it(minilm):
    model = SentenceTransformer(minilm, device="cpu")
    model.prompts = {"query": "search query: ", "document": ""}
    assert CaptionEmbedder(model).query_prefix == "search query: "


def test_bge_name_gives_the_bge_query_prefix(minilm):
    model = SentenceTransformer(minilm, device="cpu")
    assert CaptionEmbedder(model, name="BAAI/bge-small-en-v1.5").query_prefix == BGE_QUERY_INSTRUCTION


def test_embed_queries_without_a_prefix_equal_embed_captions(embedder, vectors):
    np.testing.assert_allclose(embedder.embed_queries(CAPTIONS), vectors, atol=1e-5)


def test_embed_queries_prepends_the_query_prefix(minilm, vectors):
    embedder = CaptionEmbedder(minilm, device="cpu")
    embedder.query_prefix = BGE_QUERY_INSTRUCTION
    queries = embedder.embed_queries(CAPTIONS)
    np.testing.assert_allclose(
        queries, embedder.embed_captions([BGE_QUERY_INSTRUCTION + c for c in CAPTIONS]), atol=1e-5)
    assert not np.allclose(queries, vectors, atol=1e-3)

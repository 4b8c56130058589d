"""CaptionEmbedder with the real all-MiniLM-L6-v2, and the prompt rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from caption_embedder import BGE_QUERY_INSTRUCTION, CaptionEmbedder, TextPrompts, resolve_prompts
from conftest import DOCUMENT_PROMPT, QUERY_PROMPT
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


# ------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("name", ["BAAI/bge-base-en-v1.5", "BAAI/bge-small-en-v1.5",
                                  "BAAI/bge-large-en-v1.5"])
def test_bge_english_models_get_the_bge_query_instruction_and_no_document_prompt(name):
    assert resolve_prompts(name, None) == TextPrompts(BGE_QUERY_INSTRUCTION, "")
    assert resolve_prompts(name, {"query": "", "document": ""}) == TextPrompts(
        BGE_QUERY_INSTRUCTION, "")


@pytest.mark.parametrize("name", ["BAAI/bge-m3", "BAAI/bge-base-zh-v1.5",
                                  "sentence-transformers/all-MiniLM-L6-v2",
                                  "intfloat/multilingual-e5-large-instruct"])
def test_other_models_get_no_prompts(name):
    assert resolve_prompts(name, None) == TextPrompts("", "")


@pytest.mark.parametrize("name", ["intfloat/e5-small-v2", "intfloat/multilingual-e5-base"])
def test_e5_models_get_query_and_passage(name):
    assert resolve_prompts(name, None) == TextPrompts("query: ", "passage: ")
    # a pair: a database whose captions have no prompt gets queries without one too
    assert resolve_prompts(name, None, document="") == TextPrompts("", "")


def test_the_model_prompts_win_over_the_name():
    gemma = {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT, "Retrieval": "task: x | "}
    assert resolve_prompts("google/embeddinggemma-300m", gemma) == TextPrompts(
        QUERY_PROMPT, DOCUMENT_PROMPT)
    assert resolve_prompts("BAAI/bge-base-en-v1.5", {"query": "query: ", "passage": "p: "}
                           ) == TextPrompts("query: ", "p: ")   # "passage", as encode_document


def test_prompts_given_are_used_as_they_are():
    gemma = {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT}
    assert resolve_prompts("any", gemma, query="q: ", document="") == TextPrompts("q: ", "")


def test_minilm_has_no_prompts(embedder):
    assert embedder.prompts == TextPrompts("", "")


def test_embed_queries_without_a_prompt_equal_embed_captions(embedder, vectors):
    np.testing.assert_allclose(embedder.embed_queries(CAPTIONS), vectors, atol=1e-5)


def test_a_model_with_prompts_embeds_captions_as_documents_and_queries_as_queries(
        prompt_minilm, minilm, vectors):
    embedder = CaptionEmbedder(prompt_minilm, device="cpu")
    assert embedder.prompts == TextPrompts(QUERY_PROMPT, DOCUMENT_PROMPT)
    plain = CaptionEmbedder(minilm, device="cpu")
    np.testing.assert_allclose(embedder.embed_captions(CAPTIONS), plain.embed_captions(
        [DOCUMENT_PROMPT + c for c in CAPTIONS]), atol=1e-5)
    np.testing.assert_allclose(embedder.embed_queries(CAPTIONS), plain.embed_captions(
        [QUERY_PROMPT + c for c in CAPTIONS]), atol=1e-5)
    assert not np.allclose(embedder.embed_captions(CAPTIONS), vectors, atol=1e-3)


def test_prompts_can_be_set_or_switched_off(prompt_minilm, vectors):
    embedder = CaptionEmbedder(prompt_minilm, device="cpu", query_prompt="",
                               document_prompt="")
    np.testing.assert_allclose(embedder.embed_captions(CAPTIONS), vectors, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_queries(CAPTIONS), vectors, atol=1e-5)


def test_bge_name_gives_the_bge_query_instruction(minilm, vectors):
    model = SentenceTransformer(minilm, device="cpu")
    embedder = CaptionEmbedder(model, name="BAAI/bge-small-en-v1.5")
    assert embedder.prompts == TextPrompts(BGE_QUERY_INSTRUCTION, "")
    np.testing.assert_allclose(embedder.embed_captions(CAPTIONS), vectors, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_queries(CAPTIONS), embedder.embed_captions(
        [BGE_QUERY_INSTRUCTION + c for c in CAPTIONS]), atol=1e-5)


def test_a_language_the_tokenizer_does_not_know_shows_as_unknown_tokens(embedder):
    assert embedder.unknown_fraction("a bright red mini dress") == 0.0
    assert embedder.unknown_fraction("밝은 빨간색 미니 원피스") > 0.1

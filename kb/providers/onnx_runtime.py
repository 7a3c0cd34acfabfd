"""A sentence-transformers model exported to ONNX and run by ONNX Runtime, for queries.

This serves the torch backend (kb.providers.local, the `.[torch]` extra). The default
model needs no export: it is an ONNX file already (kb.providers.onnx_embeddings).

Search embeds one short query per request. At that size a torch forward pass of
all-MiniLM-L6-v2 goes mostly to per-operator dispatch and small matrix products, and
ONNX Runtime runs the same graph in about half the time (docs/RETRIEVAL.md has the
figures). Batches of whole chunks are large matrix products, where torch is as fast, so
ingestion stays on torch.

Every module of the model (transformer, pooling, normalisation, any dense layer) is
traced once into a file named by a digest of its weights and of the libraries that
traced it, and checked against torch on probe texts whenever it is loaded. A model
whose graph does not trace faithfully fails that check, and its queries stay on torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from onnxruntime import InferenceSession
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

# Part of the file's digest: bump it when the export itself changes.
EXPORT_VERSION = 1
OPSET = 17
# Float32 graphs that agree differ by about 2e-7 here; a mis-traced graph by far more.
TOLERANCE = 1e-4
# Empty, short, truncated at the model's limit, and scripts the tokenizer splits oddly.
VERIFICATION_TEXTS = (
    "",
    "Does vitamin D lower the risk of fractures?",
    "repeated words past the model's length limit " * 80,
    "Ünïcödé, 漢字, кириллица, emoji 🙂, tabs\tand\nnewlines",
)


class OnnxExportError(Exception):
    """The model could not be exported, loaded or verified; the message says which."""


class OnnxSentenceEncoder:
    """Unit vectors for texts, computed by ONNX Runtime from the model's own tokenizer."""

    def __init__(self, *, session: InferenceSession, encoder: SentenceTransformer,
                 input_names: Sequence[str], path: Path) -> None:
        self.session = session
        self.path = path
        self._encoder = encoder
        self._input_names = tuple(input_names)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # The model's own preprocessing, so truncation and special tokens match torch's.
        features = self._encoder.preprocess(list(texts))
        (vectors,) = self.session.run(
            None, {name: features[name].numpy() for name in self._input_names}
        )
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # torch.nn.functional.normalize's epsilon, as encode(normalize_embeddings=True) uses.
        return vectors / np.maximum(norms, 1e-12)


def onnx_sentence_encoder(
    encoder: SentenceTransformer, *, cache_dir: Path, threads: int = 0
) -> OnnxSentenceEncoder:
    """The encoder's ONNX twin, exported into cache_dir unless already there, and verified.

    `encoder` is a loaded SentenceTransformer. `threads` bounds ONNX Runtime's intra-op
    threads (0: one per core). Call it on the thread that runs the model's torch passes:
    verification runs one. Raises OnnxExportError if the twin is not faithful.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxExportError(f"onnxruntime is not installed ({exc})") from exc
    input_names = _input_names(encoder)
    path = Path(cache_dir) / f"{model_digest(encoder)}.onnx"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1

    def load() -> OnnxSentenceEncoder:
        try:
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's errors share no base class of their own
            raise OnnxExportError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
        twin = OnnxSentenceEncoder(
            session=session, encoder=encoder, input_names=input_names, path=path
        )
        _verify(twin, encoder)
        return twin

    if path.exists():
        try:
            return load()
        except OnnxExportError as exc:
            # A cached file that will not load or verify (a disk fault, a data directory
            # copied between machines) is exported again, once.
            logger.warning("Exporting the query encoder again: %s", exc)
    _export(encoder, input_names, path)
    return load()


def model_digest(encoder: SentenceTransformer) -> str:
    """A name for the export: the model's weights, structure, and the tracing libraries."""
    import onnx
    import sentence_transformers
    import torch
    import transformers

    digest = hashlib.sha256()
    versions = (EXPORT_VERSION, OPSET, torch.__version__, transformers.__version__,
                sentence_transformers.__version__, onnx.__version__)
    digest.update(repr(versions).encode())
    # The module tree's repr carries each module's configuration (pooling mode, length limit).
    digest.update(repr(encoder).encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _input_names(encoder: SentenceTransformer) -> list[str]:
    features = encoder.preprocess(["probe"])
    names = [name for name in encoder.tokenizer.model_input_names if name in features]
    if "input_ids" not in names:
        raise OnnxExportError(
            f"the model's tokenizer gives no input_ids (it gives {sorted(features)})"
        )
    return names


def _export(encoder: SentenceTransformer, input_names: Sequence[str], path: Path) -> None:
    """Trace the encoder into `path`, atomically: a reader sees the whole file or none."""
    import torch

    class PositionalInputs(torch.nn.Module):
        # ONNX graphs take positional tensors; sentence-transformers modules take a dict.
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, *inputs):
            return self.encoder(dict(zip(input_names, inputs, strict=True)))["sentence_embedding"]

    features = encoder.preprocess(["an example input for tracing"])
    axes = {name: {0: "texts", 1: "tokens"} for name in input_names}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".partial")
        os.close(handle)
    except OSError as exc:
        raise OnnxExportError(f"cannot write the ONNX export to {path.parent}: {exc}") from exc
    try:
        encoder.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python branch on a tensor's size; the graph is
            # verified against torch instead, on texts of several lengths.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                PositionalInputs(), tuple(features[name] for name in input_names), partial,
                input_names=list(input_names), output_names=["sentence_embedding"],
                dynamic_axes={**axes, "sentence_embedding": {0: "texts"}},
                opset_version=OPSET, dynamo=False,
            )
        os.replace(partial, path)
    except Exception as exc:
        raise OnnxExportError(f"exporting the model to ONNX failed: {exc}") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("Exported the query encoder to %s", path)


def _verify(twin: OnnxSentenceEncoder, encoder: SentenceTransformer) -> None:
    expected = encoder.encode(list(VERIFICATION_TEXTS), normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
    try:
        # One text at a time, as queries come, so no padding hides a length-dependent fault.
        got = np.vstack([twin.encode([text]) for text in VERIFICATION_TEXTS])
    except Exception as exc:  # what a mis-traced graph raises depends on the operator
        raise OnnxExportError(f"ONNX Runtime failed on a verification text: {exc}") from exc
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise OnnxExportError(
            f"its vectors differ from torch's by {difference:.2e} (> {TOLERANCE})"
        )

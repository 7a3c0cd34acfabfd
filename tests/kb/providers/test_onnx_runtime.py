"""Queries to the local model run on its ONNX Runtime twin, exported once and verified."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kb.providers.local import SentenceTransformerEmbeddings

# The torch backend's ONNX twin for queries: without the torch extra there is no backend.
pytest.importorskip("sentence_transformers",
                    reason="the torch backend needs the torch extra: pip install -e '.[dev,torch]'")

TEXTS = [
    "How are uploaded documents chunked?",
    "",
    "BM25 & vector | fusion ! ( ) :* \"quoted\" 🙂 漢字 кириллица",
    "a long query " * 200,
]


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.KB_DATA_DIR = tmp_path
    return tmp_path


def test_queries_run_on_onnx_runtime_and_match_torch(data_dir):
    backend = SentenceTransformerEmbeddings()

    twin = backend.query_encoder

    assert twin is not None and twin.path.parent == data_dir / "onnx"
    for text in TEXTS:
        on_onnx = backend.embed_query(text)
        on_torch = backend.embed_batch([text])
        assert np.abs(np.array(on_onnx.vectors[0]) - np.array(on_torch.vectors[0])).max() < 1e-5
        assert on_onnx.input_tokens == on_torch.input_tokens
        assert np.linalg.norm(on_onnx.vectors[0]) == pytest.approx(1.0, abs=1e-5)


def test_the_export_is_reused_and_a_corrupt_one_is_exported_again(data_dir, caplog):
    exported = SentenceTransformerEmbeddings().query_encoder.path
    written = exported.stat().st_mtime_ns

    assert SentenceTransformerEmbeddings().query_encoder.path == exported
    assert exported.stat().st_mtime_ns == written

    exported.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="kb.providers.onnx_runtime"):
        again = SentenceTransformerEmbeddings()
        vector = again.embed_query(TEXTS[0]).vectors[0]

    assert again.query_encoder is not None and exported.stat().st_size > 1_000_000
    assert "Exporting the query encoder again" in caplog.text
    reloaded = again.embed_batch([TEXTS[0]]).vectors[0]
    assert np.abs(np.array(vector) - np.array(reloaded)).max() < 1e-5
    assert not list(exported.parent.glob("*.partial"))


def test_a_failed_export_leaves_queries_on_torch_with_a_warning(settings, tmp_path, caplog):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("in the way")
    settings.KB_DATA_DIR = not_a_directory
    backend = SentenceTransformerEmbeddings()

    with caplog.at_level(logging.WARNING, logger="kb.providers.local"):
        result = backend.embed_query(TEXTS[0])

    assert backend.query_encoder is None
    assert "run on torch" in caplog.text
    assert result.vectors == backend.embed_batch([TEXTS[0]]).vectors


def test_query_runtime_torch_exports_nothing(data_dir):
    backend = SentenceTransformerEmbeddings(query_runtime="torch")

    assert backend.embed_query(TEXTS[0]).vectors == backend.embed_batch([TEXTS[0]]).vectors
    assert backend.query_encoder is None and not (data_dir / "onnx").exists()


def test_an_unknown_query_runtime_is_refused():
    with pytest.raises(ValueError, match="query_runtime must be one of onnxruntime, torch"):
        SentenceTransformerEmbeddings(query_runtime="tensorrt")


def test_a_query_onnx_runtime_fails_on_is_embedded_by_torch(data_dir, caplog):
    backend = SentenceTransformerEmbeddings()
    twin = backend.query_encoder

    class FailingSession:
        def run(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

    working, twin.session = twin.session, FailingSession()
    try:
        with caplog.at_level(logging.WARNING, logger="kb.providers.local"):
            result = backend.embed_query(TEXTS[0])
    finally:
        twin.session = working

    assert result.vectors == backend.embed_batch([TEXTS[0]]).vectors
    assert "embedding it on torch" in caplog.text

"""kb_eval's metrics: ranx on our runs agrees with nDCG, recall and MRR computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from search.evaluation import (
    beir_dataset_load,
    metrics_compute,
    ranked_doc_ids,
    run_from_rankings,
)


@pytest.fixture(autouse=True)
def _isolated_settings():
    """Override tests/conftest.py's settings fixture: these tests touch no database."""


def dcg(gains: list[float]) -> float:
    return sum(gain / math.log2(position + 2) for position, gain in enumerate(gains))


def test_metrics_match_hand_computed_values():
    """Graded nDCG@10 (linear gain, as trec_eval and BEIR), Recall@100 and MRR@10."""
    qrels = {"q1": {"a": 2, "b": 1, "z": 1}, "q2": {"c": 1}, "q3": {"d": 1}}
    rankings = {
        "q1": ["x", "b", "a", "y"],  # z never retrieved
        "q2": ["c"],
        "q3": [f"n{i}" for i in range(10)] + ["d"],  # relevant at rank 11: out of @10 metrics
    }
    got = metrics_compute(qrels=qrels, run=run_from_rankings(rankings))

    ndcg_q1 = dcg([0, 1, 2, 0]) / dcg([2, 1, 1])
    expected = {
        "ndcg@10": (ndcg_q1 + 1.0 + 0.0) / 3,
        "recall@100": (2 / 3 + 1.0 + 1.0) / 3,
        "mrr@10": (1 / 2 + 1.0 + 0.0) / 3,
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-4), name


def test_a_query_without_results_scores_zero():
    """Judged queries missing from the run count as zeros, not as skipped."""
    got = metrics_compute(qrels={"q1": {"a": 1}, "q2": {"b": 1}},
                          run=run_from_rankings({"q1": ["a"]}))

    assert got == {"ndcg@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5}


def test_run_scores_preserve_the_ranking_exactly():
    """Synthetic scores are strictly decreasing, so ranx cannot reorder ties."""
    run = run_from_rankings({"q": ["b", "a", "c"]})["q"]

    assert sorted(run, key=run.get, reverse=True) == ["b", "a", "c"]


def test_chunk_hits_map_to_corpus_ids_at_their_best_rank():
    """A document counts once, at its first chunk; a document standing for duplicate texts
    contributes all their ids there."""
    ranked = ranked_doc_ids(
        document_ids=[7, 7, 3, 9, 3],
        doc_ids_by_document={7: ["d7"], 3: ["d3", "d3-copy"], 9: ["d9"]},
    )

    assert ranked == ["d7", "d3", "d3-copy", "d9"]


def test_beir_loader_reads_test_queries_and_graded_qrels(tmp_path):
    """Only queries judged in qrels/test.tsv are evaluated; the header line is skipped."""
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "T", "text": "one"}) + "\n"
        + json.dumps({"_id": "d2", "title": "Only a title", "text": ""}) + "\n"
    )
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "first"}) + "\n"
        + json.dumps({"_id": "q2", "text": "unjudged"}) + "\n"
    )
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\n"
    )

    dataset = beir_dataset_load(path=tmp_path)

    assert dataset.queries == {"q1": "first"}
    assert dataset.qrels == {"q1": {"d1": 2, "d2": 1}}
    assert [entry.data for entry in dataset.corpus] == [b"one", b"Only a title"]
    assert len(dataset.corpus_sha256) == 64

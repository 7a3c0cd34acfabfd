"""`manage.py kb_eval --dataset DIR [--modes ...] [--json FILE]`: retrieval quality on BEIR data;
`manage.py kb_eval --golden SLUG`: on a collection's golden set, as the collection is now."""

from __future__ import annotations

import dataclasses
import json
from argparse import ArgumentParser
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from kb.models import Collection
from kb.ops import bootstrap
from kb.ops.database import DatabaseSetupError
from search import evaluation, golden, services


class Command(BaseCommand):
    help = (
        "Ingest a BEIR-format dataset into its own collection (reused while unchanged), run "
        "its test queries through the search service and print nDCG@10, Recall@100, MRR@10 "
        "and p50/p95 latency per mode."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--dataset",
                            help="Directory with corpus.jsonl, queries.jsonl, qrels/test.tsv.")
        source.add_argument("--golden", metavar="SLUG",
                            help="Run the collection's golden set (search.golden) instead: "
                                 "Recall@10, MRR@10 and nDCG@10 per mode.")
        parser.add_argument("--modes", default="bm25,vector,hybrid",
                            help=f"Comma-separated, from {', '.join(evaluation.MODES)}.")
        parser.add_argument("--json", dest="json_file", help="Also write the results to this file.")
        parser.add_argument("--k1", type=float, help="BM25 k1 (default: KB_BM25_K1).")
        parser.add_argument("--b", type=float, help="BM25 b (default: KB_BM25_B).")
        parser.add_argument("--rrf-k", type=int, help="RRF k (default: KB_RRF_K).")
        parser.add_argument("--candidates", type=int, default=None,
                            help="Candidates per retriever before fusion "
                                 "(default: KB_SEARCH_CANDIDATES).")
        parser.add_argument("--fusion", choices=("rrf", "convex"), default="rrf")
        parser.add_argument("--ef-search", type=int,
                            help="HNSW ef_search (default: KB_HNSW_EF_SEARCH).")
        parser.add_argument("--reranker", help="dotted.path[:model] for hybrid+rerank "
                            "(default: KB_PROVIDERS['reranker']).")
        parser.add_argument("--limit-queries", type=int, help="Only the first N test queries.")
        parser.add_argument("--split", default="test",
                            help="qrels file to evaluate (default: test).")
        parser.add_argument("--no-progress", action="store_true", help="No progress bars.")

    def handle(self, *args: object, dataset: str | None, golden: str | None, modes: str,
               json_file: str | None,
               k1: float | None, b: float | None, rrf_k: int | None, candidates: int | None,
               fusion: str,
               ef_search: int | None, reranker: str | None, limit_queries: int | None, split: str,
               no_progress: bool, **options: object) -> None:
        if golden:
            self._golden(golden, modes=modes, json_file=json_file)
            return
        assert dataset is not None
        path = Path(dataset)
        if not (path / "corpus.jsonl").is_file() or not (path / "qrels" / f"{split}.tsv").is_file():
            raise CommandError(f"{path} is not a BEIR dataset (corpus.jsonl, qrels/{split}.tsv).")
        try:
            bootstrap.database_prepare()
        except DatabaseSetupError as exc:
            raise CommandError(str(exc)) from None
        # Evaluation runs in a data directory of its own (KB_PGDATA), often a fresh one.
        if bootstrap.migrations_pending():
            call_command("migrate", interactive=False, verbosity=0)
        wanted = [mode.strip() for mode in modes.split(",") if mode.strip()]
        reranker_entry = self._reranker_entry(wanted, reranker)
        data = evaluation.beir_dataset_load(path=path, split=split)
        self.stdout.write(f"{data.name}: {len(data.corpus)} corpus entries, {len(data.queries)} "
                          f"judged {split} queries, corpus sha256 {data.corpus_sha256[:12]}…")
        prepared = self._collection_prepare(data, no_progress=no_progress)
        results = []
        candidates = candidates or settings.KB_SEARCH_CANDIDATES
        with evaluation.retrieval_settings(k1=k1, b=b, rrf_k=rrf_k, ef_search=ef_search,
                                           reranker=reranker_entry):
            used = {
                "k1": settings.KB_BM25_K1, "b": settings.KB_BM25_B, "rrf_k": settings.KB_RRF_K,
                "candidates": candidates, "fusion": fusion,
                "ef_search": ef_search or settings.KB_HNSW_EF_SEARCH,
                "chunk_max_tokens": settings.KB_CHUNK_MAX_TOKENS,
                "chunk_overlap_tokens": settings.KB_CHUNK_OVERLAP_TOKENS,
                "reranker": settings.KB_PROVIDERS.get("reranker"),
                "rerank_top_n": settings.KB_RERANK_TOP_N,
            }
            for mode in wanted:
                results.append(self._mode_evaluate(data, prepared, mode, candidates=candidates,
                                                   fusion=fusion, limit_queries=limit_queries,
                                                   no_progress=no_progress))
        self._report(data, prepared, results, used=used, json_file=json_file)

    def _golden(self, slug: str, *, modes: str, json_file: str | None) -> None:
        try:
            bootstrap.database_prepare()
        except DatabaseSetupError as exc:
            raise CommandError(str(exc)) from None
        collection = Collection.objects.filter(slug=slug).first()
        if collection is None:
            raise CommandError(f"No collection {slug!r}.")
        wanted = [mode.strip() for mode in modes.split(",") if mode.strip()]
        if not wanted or any(mode not in services.MODES for mode in wanted):
            raise CommandError(f"With --golden, modes are {', '.join(services.MODES)}.")
        try:
            results = golden.golden_set_evaluate(collection=collection, modes=wanted)
        except golden.GoldenSetError as exc:
            raise CommandError(str(exc)) from None
        first = results[0]
        self.stdout.write(f"{slug}: golden set v{first.version}, {first.queries} questions")
        names = golden.GOLDEN_METRICS
        self.stdout.write("mode      " + "".join(f"{name:>11}" for name in names))
        for result in results:
            self.stdout.write(f"{result.mode:<10}"
                              + "".join(f"{result.metrics[name]:>11.4f}" for name in names))
        if json_file:
            Path(json_file).write_text(json.dumps(
                [dataclasses.asdict(result) for result in results], indent=2))

    def _reranker_entry(self, wanted: list[str], reranker: str | None) -> dict | None:
        """The --reranker entry, once the modes are known and hybrid+rerank has a reranker."""
        unknown = [mode for mode in wanted if mode not in evaluation.MODES]
        if unknown or not wanted:
            raise CommandError(f"Unknown mode(s) {unknown}; "
                               f"choose from {', '.join(evaluation.MODES)}.")
        if reranker:
            try:
                return evaluation.reranker_entry_parse(reranker)
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
        if "hybrid+rerank" in wanted and not settings.KB_PROVIDERS.get("reranker"):
            raise CommandError("hybrid+rerank needs a reranker: configure KB_PROVIDERS['reranker'] "
                               "or pass --reranker dotted.path[:model].")
        return None

    def _collection_prepare(
        self, data: evaluation.BeirDataset, *, no_progress: bool
    ) -> evaluation.EvalCollection:
        """The dataset's collection, ingested or reused, and checked complete."""
        with tqdm(desc="Ingesting", unit="doc", disable=no_progress) as docs_bar, \
                tqdm(desc="Embedding", unit="chunk", disable=no_progress) as chunks_bar:
            def progress(done: int, total: int) -> None:
                docs_bar.total = total
                docs_bar.n = done
                docs_bar.refresh()

            prepared = evaluation.eval_collection_prepare(
                dataset=data, progress=progress, on_embedded=chunks_bar.update
            )
        if prepared.reused:
            self.stdout.write(f"Reusing collection {prepared.collection.slug} (corpus unchanged).")
        else:
            self.stdout.write(f"Ingested {prepared.ingested} documents into "
                              f"{prepared.collection.slug}.")
        for name, reason in prepared.failures:
            self.stderr.write(f"FAILED {name}: {reason}")
        problems = evaluation.eval_collection_check(dataset=data, prepared=prepared)
        if problems:
            raise CommandError("The collection is not in a state to evaluate: "
                               + "; ".join(problems)
                               + ". Nothing was reported; run kb_eval again once it is.")
        return prepared

    def _mode_evaluate(self, data: evaluation.BeirDataset, prepared: evaluation.EvalCollection,
                       mode: str, *, candidates: int, fusion: str, limit_queries: int | None,
                       no_progress: bool) -> evaluation.ModeResult:
        total = len(data.queries) if not limit_queries else min(limit_queries, len(data.queries))
        with tqdm(total=total, desc=mode, unit="query", disable=no_progress) as bar:
            try:
                return evaluation.mode_evaluate(
                    dataset=data, prepared=prepared, mode=mode, candidates=candidates,
                    fusion=fusion, limit_queries=limit_queries, on_query=bar.update,
                )
            except evaluation.EvaluationError as exc:
                raise CommandError(str(exc)) from exc

    def _report(self, data: evaluation.BeirDataset, prepared: evaluation.EvalCollection,
                results: list[evaluation.ModeResult], *, used: dict, json_file: str | None) -> None:
        self.stdout.write(f"\n{data.name} (k1={used['k1']}, b={used['b']}, rrf_k={used['rrf_k']}, "
                          f"candidates={used['candidates']}, ef_search={used['ef_search']}, "
                          f"chunks={used['chunk_max_tokens']}/"
                          f"{used['chunk_overlap_tokens']} tokens)")
        self.stdout.write(evaluation.results_table(results))
        for result in results:
            for notice in result.notices:
                self.stdout.write(f"note ({result.mode}): {notice}")
        if json_file:
            Path(json_file).write_text(json.dumps({
                "dataset": data.name,
                "collection": prepared.collection.slug,
                "corpus_sha256": data.corpus_sha256,
                "queries": len(data.queries),
                "settings": used,
                "modes": {r.mode: r.as_dict() for r in results},
            }, indent=2, default=str))
            self.stdout.write(f"Wrote {json_file}")

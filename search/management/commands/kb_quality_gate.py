"""`manage.py kb_quality_gate --bm25-engine E --rrf-k N --bm25-k1 X --bm25-b X`, or
`--chunk-max-tokens N --chunk-overlap-tokens M`: before changing those settings (and, for
chunking, re-processing every document), whether search would do as well with them
(search.quality_gate)."""

from __future__ import annotations

import json
from argparse import ArgumentParser

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from search.quality_gate import chunking_gate, settings_gate


class Command(BaseCommand):
    help = ("Search each collection's golden set (or queries generated from its chunks) with "
            "the settings as they are and as given, and say whether the change would search "
            "worse: Recall@10 and MRR@10 in the bm25 and hybrid modes, within "
            "KB_QUALITY_GATE_TOLERANCE. Exits with status 1 when it would.")

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--bm25-engine", choices=("auto", "sql", "pg_textsearch"))
        parser.add_argument("--rrf-k", type=int)
        parser.add_argument("--bm25-k1", type=float)
        parser.add_argument("--bm25-b", type=float)
        parser.add_argument("--chunk-max-tokens", type=int,
                            help="Measure re-chunking: each collection (up to 500 documents) "
                                 "is copied, chunked this way, compared, and the copy deleted.")
        parser.add_argument("--chunk-overlap-tokens", type=int)
        parser.add_argument("--json", dest="as_json", action="store_true",
                            help="Print the whole verdict.")

    def handle(self, *args: object, bm25_engine: str | None, rrf_k: int | None,
               bm25_k1: float | None, bm25_b: float | None, chunk_max_tokens: int | None,
               chunk_overlap_tokens: int | None, as_json: bool, **options: object) -> None:
        changes: dict[str, object] = {name: value for name, value in (
            ("KB_BM25_ENGINE", bm25_engine), ("KB_RRF_K", rrf_k), ("KB_BM25_K1", bm25_k1),
            ("KB_BM25_B", bm25_b)) if value is not None}
        chunking = chunk_max_tokens is not None or chunk_overlap_tokens is not None
        if chunking and changes:
            raise CommandError("Measure a chunking change on its own, without search settings.")
        if chunking:
            max_tokens = chunk_max_tokens or settings.KB_CHUNK_MAX_TOKENS
            overlap = (settings.KB_CHUNK_OVERLAP_TOKENS if chunk_overlap_tokens is None
                       else chunk_overlap_tokens)
            if not 0 <= overlap < max_tokens:
                raise CommandError("The overlap must be at least 0 and below the chunk size.")
            verdict = chunking_gate(max_tokens=max_tokens, overlap_tokens=overlap)
        elif not changes:
            raise CommandError("Name a change: --bm25-engine, --rrf-k, --bm25-k1, --bm25-b, "
                               "--chunk-max-tokens or --chunk-overlap-tokens.")
        else:
            verdict = settings_gate(changes=changes)
        self.stdout.write(json.dumps(verdict, indent=2) if as_json else verdict["summary"])
        if not verdict["passed"]:
            raise CommandError("The quality gate refuses this change.")

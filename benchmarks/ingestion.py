"""Ingestion throughput: the full pipeline against the raw embedder on the same texts,
for each embedding model given, in the same run.

    KB_PGDATA=/tmp/kb-bench-ingest-pgdata KB_DATA_DIR=/tmp/kb-bench-ingest \\
        .venv/bin/python benchmarks/ingestion.py [--limit 1000] [--models minilm,minilm-int8]
        [--rounds 2] [--profile]

Over ../shared/bench/scifact/corpus.jsonl beside the repository (--corpus overrides; one
.txt document per entry, titled from the corpus), one run measures, per model (the keys of
KB_PROVIDERS['embedding']; by default the torch baseline `minilm`, where torch is
installed, and the default `minilm-int8`):

1. the pipeline: documents_upload(queue=False) + documents_ingest_batch into a fresh
   collection (parse, chunk, embed, write vectors, BM25 index, switch-over) with that
   model serving, with a cold embedding cache: earlier benchmark collections are deleted
   first, and the run fails if any chunk came from the cache;
2. the raw embedder: the model's embed_batch on exactly the texts the pipeline embedded
   (read back and checked against each chunk's input hash), in the same order and batch
   size.

It prints chunks/s for both, their ratio (goal ≥ 0.85), each model's pipeline rate over
the first model's, and peak RSS. With --rounds 2 the models run A B B A, so a machine
that drifts during the run weighs on both alike. Use a data dir of its own: another
collection holding the same texts would serve them from the cache, and the run switches
the active model.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import importlib.util
import io
import json
import os
import pstats
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The shared benchmark data sits beside the repository.
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "scifact" / "corpus.jsonl"
SLUG_PREFIX = "bench-ingest-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--limit", type=int, default=1000,
                        help="Corpus entries to ingest (0: all).")
    parser.add_argument("--models", help="Embedding model keys, comma-separated; the first "
                        "is the baseline (default: minilm where torch is installed, then "
                        "the default model).")
    parser.add_argument("--rounds", type=int, default=1, choices=(1, 2),
                        help="2 runs the models A B B A.")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the pipeline and print hot spots.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)

    entries = []
    with args.corpus.open() as handle:
        for line in handle:
            if line.strip():
                entries.append(json.loads(line))
            if args.limit and len(entries) >= args.limit:
                break

    if args.models:
        keys = [key.strip() for key in args.models.split(",") if key.strip()]
    else:
        keys = [settings.KB_DEFAULT_EMBEDDING_MODEL]
        if importlib.util.find_spec("sentence_transformers") is not None:
            keys.insert(0, "minilm")
    order = keys if args.rounds == 1 else [*keys, *reversed(keys)]
    runs: dict[str, list[dict]] = {key: [] for key in keys}
    for key in order:
        figures = _measure(key, entries, profile=args.profile)
        runs[key].append(figures)
        _print_run(figures)

    baseline = _mean(runs[keys[0]], "pipeline_chunks_per_s")
    print(f"\nsummary over {args.rounds} round(s), pipeline chunks/s relative to {keys[0]}:")
    for key in keys:
        rate = _mean(runs[key], "pipeline_chunks_per_s")
        print(f"  {key:14s} pipeline {rate:7.2f} chunks/s  ×{rate / baseline:.2f}  "
              f"raw {_mean(runs[key], 'raw_chunks_per_s'):7.2f} chunks/s  "
              f"ratio {_mean(runs[key], 'ratio'):.3f}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


def _mean(runs: list[dict], field: str) -> float:
    return sum(run[field] for run in runs) / len(runs)


def _serve_with(key: str):
    """Make the model for key the active one, as if it had always served (benchmark only:
    the product switches models through a complete re-embedding)."""
    from django.db import transaction
    from django.utils import timezone

    from kb import embeddings
    from kb.models import EmbeddingModel

    model = embeddings.embedding_model_register(key=key)
    with transaction.atomic():
        EmbeddingModel.objects.filter(is_active=True).exclude(pk=model.pk).update(
            is_active=False, status=EmbeddingModel.Status.READY)
        EmbeddingModel.objects.filter(pk=model.pk).update(
            is_active=True, status=EmbeddingModel.Status.ACTIVE, activated_at=timezone.now())
    embeddings.embedding_model_index_create(model=model)
    return EmbeddingModel.objects.get(pk=model.pk)


def _measure(key: str, entries: list[dict], *, profile: bool) -> dict:
    from django.conf import settings

    from kb import embeddings
    from kb.ingestion.chunking import embedding_input
    from kb.models import Chunk, Collection, Document
    from kb.services.collections import collection_get_or_create
    from kb.services.documents import document_delete
    from kb.services.ingest import documents_ingest_batch
    from kb.services.uploads import documents_upload

    # A cold cache: vectors of earlier runs would be copied instead of embedded.
    for old in Collection.objects.filter(slug__startswith=SLUG_PREFIX):
        for document in Document.objects.filter(collection=old):
            document_delete(document=document)
        old.delete()
    collection = collection_get_or_create(slug=f"{SLUG_PREFIX}{int(time.time())}")
    model = _serve_with(key)
    backend = embeddings.backend_for(model)
    backend.embed_batch(["warm up the model so neither side pays for loading it"])

    embedded = 0

    def on_embedded(count: int) -> None:
        nonlocal embedded
        embedded += count

    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    document_ids = []
    for entry in entries:
        (outcome,) = documents_upload(
            collection=collection, filename=f"{entry['_id']}.txt",
            data=(entry.get("text") or entry.get("title") or "").encode(),
            metadata={"title": entry.get("title") or "", "beir_id": entry["_id"]}, queue=False,
        )
        if outcome.outcome in {"created", "updated"}:
            document_ids.append(outcome.document.pk)
    uploaded = time.perf_counter()
    documents_ingest_batch(document_ids=document_ids, on_embedded=on_embedded)
    finished = time.perf_counter()
    if profiler:
        profiler.disable()

    chunks = list(
        Chunk.objects.filter(collection=collection, searchable=True)
        .select_related("document").order_by("document_id", "ordinal")
    )
    failed = (
        Document.objects.filter(collection=collection)
        .exclude(status=Document.Status.READY).count()
    )
    if embedded != len(chunks):
        sys.exit(f"{len(chunks) - embedded} of {len(chunks)} chunks came from the embedding cache; "
                 "use a fresh KB_PGDATA so the pipeline embeds every chunk.")
    # Rebuild the exact inputs the pipeline embedded, in its order (documents as given,
    # chunks by ordinal), and check each against the chunk's stored input hash.
    order = {pk: i for i, pk in enumerate(document_ids)}
    chunks.sort(key=lambda c: (order[c.document_id], c.ordinal))
    texts = []
    for chunk in chunks:
        text = embedding_input(title=chunk.document.title, heading_path=chunk.heading_path,
                               text=chunk.text)
        assert hashlib.sha256(text.encode()).hexdigest() == chunk.embedding_input_hash, chunk.pk
        texts.append(text)

    raw_started = time.perf_counter()
    for start in range(0, len(texts), backend.batch_size):
        backend.embed_batch(texts[start : start + backend.batch_size])
    raw_seconds = time.perf_counter() - raw_started

    pipeline_seconds = finished - started
    pipeline_rate = len(chunks) / pipeline_seconds
    raw_rate = len(texts) / raw_seconds
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if profiler:
        _print_profile(profiler)
    return {
        "model": key, "backend": model.backend,
        "documents": len(entries), "failed": failed, "chunks": len(chunks),
        "tokens_per_chunk": round(sum(c.token_count for c in chunks) / max(1, len(chunks)), 1),
        "batch_size": backend.batch_size, "chunk_max_tokens": settings.KB_CHUNK_MAX_TOKENS,
        "upload_s": round(uploaded - started, 2), "ingest_s": round(finished - uploaded, 2),
        "pipeline_s": round(pipeline_seconds, 2), "pipeline_chunks_per_s": round(pipeline_rate, 2),
        "raw_s": round(raw_seconds, 2), "raw_chunks_per_s": round(raw_rate, 2),
        "ratio": round(pipeline_rate / raw_rate, 3), "peak_rss_mb": round(peak_mb, 1),
        "torch_threads": _torch_threads(),
        # Other processes on the machine skew both rates; the load average says how busy it was.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


def _print_run(figures: dict) -> None:
    print(f"\n{figures['model']} ({figures['backend']})")
    print(f"documents {figures['documents']} ({figures['failed']} failed), chunks "
          f"{figures['chunks']} (~{figures['tokens_per_chunk']} tokens), batch size "
          f"{figures['batch_size']}")
    print(f"pipeline      {figures['pipeline_s']:8.1f} s  {figures['pipeline_chunks_per_s']:7.2f} "
          f"chunks/s  (upload {figures['upload_s']} s, ingest {figures['ingest_s']} s)")
    print(f"raw embedder  {figures['raw_s']:8.1f} s  {figures['raw_chunks_per_s']:7.2f} chunks/s")
    print(f"ratio         {figures['ratio']:.3f}  (goal ≥ 0.85)")
    print(f"peak RSS      {figures['peak_rss_mb']:.0f} MB   "
          f"(load average {figures['load_average_1m_at_end']} at the end, "
          f"{os.cpu_count()} CPUs)")


def _torch_threads() -> int | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.get_num_threads()


def _print_profile(profiler: cProfile.Profile) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(r"kb/(services|embeddings|usage|ingestion|providers)|sentence_transformers/.*encode|"
                      r"django/db/backends/utils.py.*execute|storage", 40)
    print("\nProfile of the pipeline (cumulative seconds):")
    print(stream.getvalue())


if __name__ == "__main__":
    main()

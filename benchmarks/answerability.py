"""Fit and measure the chat's answerability decision (chat.answerability) on a labelled set.

    PYTHONPATH=. .venv/bin/python benchmarks/answerability.py --bench-dir DIR [--queries 40]

For each BEIR dataset (scifact, nfcorpus, cranfield, cisi by default) a small collection
is built from a sample: every judged-relevant document of --queries sampled test queries
(at most 3 per query) plus random distractors, up to --docs documents. Then:

A fifth collection holds the demo documents (fixtures/demo), with hand-written questions
they answer. Then:

- in scope: each sampled query asked of its own collection (its documents cover it),
  and the demo questions asked of the demo;
- out of scope: --foreign queries of every other dataset asked of each collection (a
  third as many of the demo), and a list of nonsense and general-knowledge questions
  asked of every collection.

Each question goes through search() exactly as the chat asks it (hybrid, KB_CHAT_TOP_K)
and chat.answerability's evidence. A logistic regression over the evidence is fitted
with 2-fold cross-validation (split by question), and the held-out false "I don't know"
rate (in-scope questions judged not covered) and false-answer rate (out-of-scope ones
judged covered) are printed for a sweep of thresholds; then the coefficients fitted on
everything, to paste into chat/answerability.py. Collections are reused between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NONSENSE = [
    "zxqv blorptang",
    "Capital of Mongolia?",
    "Who won the 1998 football World Cup?",
    "How do I bake sourdough bread at home?",
    "What is the best pizza topping?",
    "Recommend a good science fiction novel.",
    "How tall is Mount Everest?",
    "Translate 'good morning' into French.",
    "qwerty uiop asdf ghjkl",
    "What is the plot of Hamlet?",
]
# The product's own demo documents (fixtures/demo), with questions they answer, labelled
# by hand: a small collection of prose, unlike the BEIR abstracts.
DEMO_QUESTIONS = [
    "How are duplicate uploads handled?",
    "What file formats can I upload?",
    "How does BM25 keyword search work?",
    "What does hybrid search combine?",
    "How do I change the embedding model?",
    "What happens when an upload fails?",
    "How do I disable a document?",
    "What do the citation numbers in an answer mean?",
    "What is the difference between generated and extracted answers?",
    "What happens when a rate limit is exceeded?",
    "Which endpoint lists the collections as models?",
    "How do I start the knowledge base?",
    "What should I know about budgets?",
    "What should I know about zip archives?",
    "Can I stop an answer while it is streaming?",
    "How do I filter search results by metadata?",
]
FEATURES = ("coverage", "top_similarity", "agreement")


def sample_dataset(dataset, *, queries: int, docs: int, rng: random.Random):
    """The dataset cut down to `queries` judged queries, their relevant docs and distractors."""
    qids = sorted(dataset.queries)
    rng.shuffle(qids)
    by_id = {entry.doc_id: entry for entry in dataset.corpus}
    chosen, keep = [], []
    for qid in qids:
        relevant = [
            d for d, score in sorted(dataset.qrels[qid].items()) if score > 0 and d in by_id
        ][:3]
        if not relevant:
            continue
        chosen.append(qid)
        keep += [d for d in relevant if d not in keep]
        if len(chosen) == queries:
            break
    others = [entry.doc_id for entry in dataset.corpus if entry.doc_id not in set(keep)]
    rng.shuffle(others)
    keep += others[: max(0, docs - len(keep))]
    corpus = [by_id[d] for d in sorted(set(keep))]
    digest = hashlib.sha256("\n".join(f"{e.doc_id}\t{e.title}\t{e.text}" for e in corpus).encode())
    subset = replace(
        dataset, name=f"answerability-{dataset.name}", corpus=corpus,
        queries={qid: dataset.queries[qid] for qid in chosen},
        qrels={qid: dataset.qrels[qid] for qid in chosen}, corpus_sha256=digest.hexdigest(),
    )
    foreign = [dataset.queries[qid] for qid in qids if qid not in set(chosen)]
    return subset, foreign


def fit_logistic(rows: list[tuple[list[float], int]], *, steps: int = 3000, rate: float = 0.5,
                 l2: float = 1e-3) -> list[float]:
    """Logistic regression by gradient descent on standardised features; raw-unit weights."""
    n = len(rows[0][0])
    means = [sum(x[i] for x, _ in rows) / len(rows) for i in range(n)]
    scales = [
        math.sqrt(sum((x[i] - means[i]) ** 2 for x, _ in rows) / len(rows)) or 1.0
        for i in range(n)
    ]
    data = [([(x[i] - means[i]) / scales[i] for i in range(n)], y) for x, y in rows]
    # Both classes weigh the same: out-of-scope questions outnumber in-scope ones.
    positives = sum(y for _, y in data)
    weight = {1: len(data) / (2 * positives), 0: len(data) / (2 * (len(data) - positives))}
    w = [0.0] * (n + 1)
    for _ in range(steps):
        grad = [0.0] * (n + 1)
        for x, y in data:
            z = w[0] + sum(wi * xi for wi, xi in zip(w[1:], x, strict=True))
            error = (1 / (1 + math.exp(-max(-60, min(60, z)))) - y) * weight[y]
            grad[0] += error
            for i, xi in enumerate(x):
                grad[i + 1] += error * xi
        w = [
            wi - rate * (g / len(data) + (l2 * wi if i else 0))
            for i, (wi, g) in enumerate(zip(w, grad, strict=True))
        ]
    raw = [w[i + 1] / scales[i] for i in range(n)]
    intercept = w[0] - sum(raw[i] * means[i] for i in range(n))
    return [intercept, *raw]


def rates(scored: list[tuple[float, int]], threshold: float) -> tuple[float, float]:
    """(false "I don't know" rate among in-scope, false-answer rate among out-of-scope)."""
    inside = [p for p, y in scored if y == 1]
    outside = [p for p, y in scored if y == 0]
    false_idk = sum(1 for p in inside if p < threshold) / max(1, len(inside))
    false_answer = sum(1 for p in outside if p >= threshold) / max(1, len(outside))
    return false_idk, false_answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-dir", type=Path, default=os.environ.get("KB_BENCH_DIR"),
                        required="KB_BENCH_DIR" not in os.environ,
                        help="The directory holding the BEIR datasets (or KB_BENCH_DIR).")
    parser.add_argument("--datasets", default="scifact,nfcorpus,cranfield,cisi")
    parser.add_argument("--queries", type=int, default=40, help="In-scope queries per dataset.")
    parser.add_argument("--docs", type=int, default=250, help="Documents per collection.")
    parser.add_argument("--foreign", type=int, default=15,
                        help="Out-of-scope queries per other dataset.")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    from chat.answerability import COEFFICIENTS, answerability_assess, answerability_probability
    from search import evaluation
    from search.services import SearchParams, search

    rng = random.Random(args.seed)
    started = time.perf_counter()
    names = [name for name in args.datasets.split(",") if name]
    collections, foreign = {}, {}
    questions: list[tuple[str, str, int, str]] = []  # (question, collection slug, label, kind)
    for name in names:
        dataset = evaluation.beir_dataset_load(path=args.bench_dir / name)
        subset, others = sample_dataset(dataset, queries=args.queries, docs=args.docs, rng=rng)
        prepared = evaluation.eval_collection_prepare(dataset=subset)
        collections[name] = prepared.collection.slug
        foreign[name] = others
        questions += [
            (text, prepared.collection.slug, 1, f"{name} in scope")
            for text in subset.queries.values()
        ]
        print(f"{name}: {len(subset.corpus)} documents, {len(subset.queries)} in-scope queries "
              f"({'reused' if prepared.reused else f'{prepared.ingested} ingested'})", flush=True)
    from kb.models import Document
    from kb.services.collections import collection_get_or_create
    from kb.services.ingest import documents_ingest_batch
    from kb.services.uploads import documents_upload

    demo = collection_get_or_create(slug="answerability-demo", name="Answerability demo")
    if not Document.objects.filter(collection=demo).exists():
        for path in sorted((ROOT / "fixtures" / "demo").glob("*.md")):
            outcomes = documents_upload(collection=demo, filename=path.name,
                                                    data=path.read_bytes(), queue=False)
            documents_ingest_batch(document_ids=[o.document.pk for o in outcomes if o.document])
    questions += [(text, demo.slug, 1, "demo in scope") for text in DEMO_QUESTIONS]
    questions += [(text, demo.slug, 0, f"{other} asked of demo") for other in names
                  for text in foreign[other][: args.foreign // 3]]
    for name, slug in collections.items():
        for other in names:
            if other != name:
                questions += [
                    (text, slug, 0, f"{other} asked of {name}")
                    for text in foreign[other][: args.foreign]
                ]
        questions += [(text, slug, 0, "nonsense") for text in NONSENSE]
    questions += [(text, demo.slug, 0, "nonsense") for text in NONSENSE]
    print(f"prepared in {time.perf_counter() - started:.0f}s; {len(questions)} questions "
          f"({sum(q[2] for q in questions)} in scope)", flush=True)

    user = evaluation.eval_user_get_or_create()
    rows = []
    assess_ms = []
    for text, slug, label, kind in questions:
        result = search(params=SearchParams(query=text, k=settings.KB_CHAT_TOP_K, mode="hybrid",
                                            rerank=None, collections=(slug,)),
                        user=user, record_usage=False)
        t = time.perf_counter()
        decision = answerability_assess(result=result)
        assess_ms.append((time.perf_counter() - t) * 1000)
        features = [decision.coverage, decision.top_similarity or 0.0, decision.agreement]
        rows.append((features, label, kind, text))

    print("\nmean evidence by kind of question:")
    kinds = sorted({row[2] for row in rows})
    for kind in kinds:
        of_kind = [row[0] for row in rows if row[2] == kind]
        means = [sum(f[i] for f in of_kind) / len(of_kind) for i in range(len(FEATURES))]
        print(f"  {kind:32s} n={len(of_kind):3d} "
              + " ".join(f"{n}={m:.3f}" for n, m in zip(FEATURES, means, strict=True)))

    # 2-fold cross-validation by question: each half is scored by the model fitted on the other.
    folds = [[row for i, row in enumerate(rows) if i % 2 == fold] for fold in (0, 1)]
    held_out = []
    for fold in (0, 1):
        coefficients = fit_logistic([(row[0], row[1]) for row in folds[1 - fold]])
        held_out += [(answerability_probability(coverage=row[0][0], top_similarity=row[0][1],
                                                agreement=row[0][2],
                                                coefficients=coefficients), row[1], row)
                     for row in folds[fold]]
    current = [(answerability_probability(coverage=row[0][0], top_similarity=row[0][1],
                                          agreement=row[0][2]), row[1]) for row in rows]
    threshold = settings.KB_CHAT_ANSWERABLE_THRESHOLD
    print(f"\nheld-out (2-fold) rates by threshold; {sum(r[1] for r in rows)} in scope, "
          f"{sum(1 - r[1] for r in rows)} out of scope:")
    print("  threshold  false_idk  false_answer")
    for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        idk, answer = rates([(p, y) for p, y, _ in held_out], t)
        print(f"  {t:9.2f}  {idk:9.3f}  {answer:12.3f}")
    idk, answer = rates(current, threshold)
    print(f"\nshipped coefficients {COEFFICIENTS} at KB_CHAT_ANSWERABLE_THRESHOLD={threshold}: "
          f"false 'I don't know' {idk:.3f}, false answer {answer:.3f} (on this whole set)")
    for kind in kinds:
        of_kind = [(p, y) for (p, y), row in zip(current, rows, strict=True) if row[2] == kind]
        wrong = sum(1 for p, y in of_kind if (p >= threshold) != bool(y))
        print(f"  {kind:32s} wrong {wrong}/{len(of_kind)}")
    everything = fit_logistic([(row[0], row[1]) for row in rows])
    print("\ncoefficients fitted on everything (intercept, " + ", ".join(FEATURES) + "):")
    print("  (" + ", ".join(f"{c:.3f}" for c in everything) + ")")
    assess_ms.sort()
    print(f"\nanswerability_assess: p50 {assess_ms[len(assess_ms) // 2]:.2f} ms, "
          f"p95 {assess_ms[int(len(assess_ms) * 0.95)]:.2f} ms per question; "
          f"total {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

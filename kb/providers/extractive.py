"""The answerer of last resort: quotes the passages' most relevant sentences, never generates.

It needs no network and no model weights, so it cannot fail, and it is always the last
entry of the chat cascade. It receives the same messages as a generative backend and
reads the numbered passages and the question back out of the user message (the format
is defined in chat.prompts). Sentences are scored with BM25 against the question, over
the sentences of the passages as the corpus, with a light suffix-stripping stemmer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from kb.providers.base import ChatBackend, ChatDelta, ChatMessage, ChatUsage

LEAD = "Extracted from your documents (not generated):"
NO_PASSAGES = "No passage in your documents matches this question."
MAX_SENTENCES = 4
MIN_SENTENCES = 3
MAX_SENTENCE_CHARS = 400
# BM25 over short "documents" (sentences): the usual constants (Robertson & Zaragoza, 2009).
K1 = 1.2
B = 0.75

_WORD = re.compile(r"[^\W_]+")
# A sentence ends at . ! ? (or a line break) followed by space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“(\[A-Z0-9])")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|[-*•+]\s+|\d+[.)]\s+|>\s*)")
# English function words: they match everywhere and would drown the question's terms.
_STOPWORD_TEXT = """a about above after again all also am an and any are as at be been before being
    between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just me
    more most my no nor not now of off on once only or other our out over own same she
    should so some such than that the their them then there these they this those through
    to too under until up very was we were what when where which while who whom why will
    with would you your yours"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_SUFFIXES = ("ations", "ation", "ements", "ement", "ings", "ing", "edly", "ed", "ies", "es", "s", "ly")


@dataclass
class _Sentence:
    n: int
    position: int
    text: str
    terms: list[str]
    score: float = 0.0


def stem(word: str) -> str:
    """A crude suffix stripper: enough for "indexes"/"indexing"/"index" to meet."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            return word + "y" if suffix == "ies" else word
    return word


def terms(text: str) -> list[str]:
    """Lower-cased, stemmed words without stopwords."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def sentences(text: str) -> list[str]:
    """A passage split into sentences; list items and headings become their own lines."""
    result = []
    for line in text.splitlines():
        line = _LINE_MARKUP.sub("", line).strip()
        if not line:
            continue
        if len(_WORD.findall(line)) < 8 and not line.rstrip().endswith((".", "!", "?", ";", ":")):
            continue  # a heading line: the source panel shows it as the heading path

        for sentence in _SENTENCE_END.split(line):
            sentence = " ".join(sentence.split())
            if len(_WORD.findall(sentence)) < 3:
                continue  # headings and fragments say too little on their own
            if len(sentence) > MAX_SENTENCE_CHARS:
                sentence = sentence[: MAX_SENTENCE_CHARS - 1].rsplit(" ", 1)[0] + "…"
            result.append(sentence)
    return result


def select_sentences(question: str, passages: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """The best (passage number, sentence) pairs for the question, in reading order."""
    pool: list[_Sentence] = []
    seen: set[str] = set()
    for n, text in passages:
        for position, sentence in enumerate(sentences(text)):
            key = " ".join(_WORD.findall(sentence.lower()))
            if key in seen:
                continue  # overlapping chunks repeat sentences
            seen.add(key)
            pool.append(_Sentence(n=n, position=position, text=sentence, terms=terms(sentence)))
    if not pool:
        return []
    query = set(terms(question))
    document_frequency = Counter(term for s in pool for term in set(s.terms))
    average_length = sum(len(s.terms) for s in pool) / len(pool) or 1.0
    for s in pool:
        counts = Counter(s.terms)
        score = 0.0
        for term in query:
            tf = counts.get(term, 0)
            if not tf:
                continue
            df = document_frequency[term]
            idf = math.log(1 + (len(pool) - df + 0.5) / (df + 0.5))
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(s.terms) / average_length))
        # Passages arrive best first: a small prior keeps ties with the better passage.
        s.score = score / (1 + 0.1 * (s.n - 1))
    ranked = sorted((s for s in pool if s.score > 0), key=lambda s: (-s.score, s.n, s.position))
    if ranked:
        best = ranked[0].score
        chosen = [s for i, s in enumerate(ranked[:MAX_SENTENCES])
                  if i < MIN_SENTENCES or s.score >= 0.25 * best]
    else:
        # Nothing shares a word with the question: the retrieval still ranked these
        # passages first, so their opening sentences are the best we can show.
        firsts: dict[int, _Sentence] = {}
        for s in pool:
            firsts.setdefault(s.n, s)
        chosen = list(firsts.values())[:2]
    chosen.sort(key=lambda s: (s.n, s.position))
    return [(s.n, s.text) for s in chosen]


def extractive_answer(question: str, passages: Sequence[tuple[int, str]]) -> str:
    """The full answer text: the lead line, then one cited sentence per line."""
    picked = select_sentences(question, passages)
    if not picked:
        return f"{LEAD}\n\n{NO_PASSAGES}"
    return LEAD + "\n\n" + "\n".join(f"{sentence} [{n}]" for n, sentence in picked)


class ExtractiveChat(ChatBackend):
    """Answers with sentences quoted from the passages in the prompt, each cited as [n]."""

    provider_name = "extractive"
    remote = False
    generative = False

    def __init__(self, *, model: str = "extractive", **options):
        super().__init__(model=model or "extractive", **options)

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[ChatDelta | ChatUsage, None]:
        """Yield the extracted answer word by word, then its (counted, free) usage."""
        from chat.prompts import NEUTRAL_MARKER, prompt_parse

        user = next((m for m in reversed(messages) if m.role == "user"), None)
        parsed = prompt_parse(user.content if user else "")
        # A document's own bracketed numbers were neutralised in the prompt; quoted, they
        # would only be noise next to our citation.
        text = extractive_answer(parsed.question,
                                 [(p.n, NEUTRAL_MARKER.sub("", p.text)) for p in parsed.passages])
        pieces = re.findall(r"\s*\S+", text)
        if max_tokens is not None:
            pieces = self._within(pieces, max_tokens)
        for piece in pieces:
            yield ChatDelta(text=piece)
        output = "".join(pieces)
        yield ChatUsage(
            input_tokens=sum(self.count_tokens(m.content) for m in messages),
            output_tokens=self.count_tokens(output),
            model=self.model,
            finish_reason="stop",
        )

    def _within(self, pieces: list[str], max_tokens: int) -> list[str]:
        kept: list[str] = []
        used = 0
        for piece in pieces:
            used += self.count_tokens(piece)
            if used > max_tokens and kept:
                break
            kept.append(piece)
        return kept

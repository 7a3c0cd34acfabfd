"""The answerer of last resort: quotes the passages' most relevant sentences and code, never
generates.

It needs no network and no model weights, so it cannot fail, and it is always the last
entry of the chat cascade. It reads the question and the numbered passages of its
Prompt (kb.providers.base), not the messages a generative backend reads. Sentences are
scored with BM25 against the question, over the sentences of the passages as the
corpus, with a light suffix-stripping stemmer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from kb.providers.base import ChatBackend, ChatDelta, ChatUsage, Prompt

# No lead line ("Extracted from your documents…"): the chat page labels extracted answers
# from `mode`, so the label is shown once.
NO_PASSAGES = "No passage in your documents matches this question."
MAX_UNITS = 4
MAX_CODE_BLOCKS = 2
# A unit is quoted only if it scores at least this share of the best one: no padding.
RELATIVE_CUTOFF = 0.5
MAX_SENTENCE_CHARS = 400
# A sentence shorter than this many words ("Defaults to 'cursor'.") only makes sense with
# the one before it, so it is quoted with it.
MIN_SENTENCE_WORDS = 6
MAX_CODE_LINES = 60
# BM25 over short "documents" (sentences): the usual constants (Robertson & Zaragoza, 2009).
K1 = 1.2
B = 0.75

# A document's own bracketed numbers, as a Prompt shows them (PromptPassage): quoted,
# they would only be noise next to our citation.
_SOURCE_NUMBERS = re.compile(r"[ \t]*［\d{1,3}(?:\s*,\s*\d{1,3})*］")
_WORD = re.compile(r"[^\W_]+")
# A sentence ends at . ! ? (or a line break) followed by space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“(\[A-Z0-9])")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|[-*•+]\s+|\d+[.)]\s+|>\s*)")
_CODE_LINE = re.compile(
    r"^(?:\s{2,}|\t)\S|[=(){};<>\[\]]|"
    r"^\s*(?:\$|>>>|def |class |import |from |return )")
# English function words: they match everywhere and would drown the question's terms.
_STOPWORD_TEXT = """a about above after again all also am an and any are as at be been before being
    between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just me
    more most my no nor not now of off on once only or other our out over own same she
    should so some such than that the their them then there these they this those through
    to too under until up very was we were what when where which while who whom why will
    with would you your yours"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# An instruction: "If a pump fails to start, do not …" begins a procedure whose steps
# ("Record the alarm code …", "Call the duty engineer …") follow in the same paragraph and
# rarely repeat the question's words, so the best-scoring sentence alone stops short.
_INSTRUCTION_START = re.compile(
    r"^(?:if|when|whenever|before|after|in case|should|to)\b|"
    r"\b(?:do not|don't|never|always|must|make sure)\b|:$", re.IGNORECASE)
_STEP_START = re.compile(
    r"^(?:then|next|finally|afterwards|also|and|please|do not|don't|never|always)\b",
    re.IGNORECASE)
# Words that open a statement rather than a command: "The …", "It …", "Pumps …".
_NOT_A_COMMAND = _STOPWORDS | frozenset([
    "although", "because", "however", "once", "since", "though", "unless", "whether", "yes",
    "anyone", "everyone", "someone", "nobody", "many", "several", "one", "two", "three"])
# How much of the procedure's paragraph an instruction may bring with it.
MAX_STEP_UNITS = 3
MAX_STEP_CHARS = 500
_SUFFIXES = (
    "ations", "ation", "ements", "ement", "ings", "ing", "edly", "ed", "ies", "es", "s", "ly"
)


@dataclass
class _Unit:
    """What may be quoted: a sentence (or short block) of prose, or a whole code block."""

    n: int
    position: int
    text: str
    terms: list[str]
    code: bool = False
    score: float = 0.0
    paragraph: int = 0


def stem(word: str) -> str:
    """A crude suffix stripper: enough for "indexes"/"indexing"/"index" to meet."""
    for suffix in _SUFFIXES:
        if suffix == "es" and not word.endswith(("sses", "xes", "zes", "ches", "shes")):
            continue  # "takes" is "take" + "s", not "tak" + "es"
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            return word + "y" if suffix == "ies" else word
    return word


def terms(text: str) -> list[str]:
    """Lower-cased, stemmed words without stopwords."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


def _is_code(lines: list[str]) -> bool:
    """Chunk text keeps code blocks' line breaks and indentation, while prose blocks are
    one line each; a multi-line block mostly of code-looking lines is code."""
    lines = [line for line in lines if line.strip()]
    if len(lines) < 2:
        return False
    return sum(1 for line in lines if _CODE_LINE.search(line)) * 2 >= len(lines)


def _prose_units(line: str) -> list[str]:
    """One prose line as quotable units: its sentences, short ones joined to the one before."""
    line = " ".join(_LINE_MARKUP.sub("", line).split())
    if not line:
        return []
    if len(_WORD.findall(line)) < 8 and not line.endswith((".", "!", "?", ";", ":")):
        return []  # a heading line: the source panel shows it as the heading path
    units: list[str] = []
    for part in _SENTENCE_END.split(line):
        if units and len(_WORD.findall(part)) < MIN_SENTENCE_WORDS:
            units[-1] = f"{units[-1]} {part}"
        else:
            units.append(part)
    result = []
    for unit in units:
        if len(_WORD.findall(unit)) < 3:
            continue  # fragments say too little on their own
        if len(unit) > MAX_SENTENCE_CHARS:
            unit = unit[: MAX_SENTENCE_CHARS - 1].rsplit(" ", 1)[0] + "…"
        result.append(unit)
    return result


def _paragraph_units(text: str) -> list[tuple[str, bool, int]]:
    """A passage as (text, is_code, paragraph) units in reading order; prose paragraphs are
    one line each in chunk text."""
    result: list[tuple[str, bool, int]] = []
    paragraph = 0
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if _is_code(lines):
            if len(lines) <= MAX_CODE_LINES:
                result.append((block.strip("\n"), True, paragraph))
            paragraph += 1
            continue
        for line in lines:
            result += [(unit, False, paragraph) for unit in _prose_units(line)]
            paragraph += 1
    return result


def units(text: str) -> list[tuple[str, bool]]:
    """A passage as (text, is_code) units in reading order."""
    return [(unit, code) for unit, code, _ in _paragraph_units(text)]


def _is_step(sentence: str) -> bool:
    """An imperative sentence ("Record the alarm code …") or one that continues a procedure
    ("Then …"): a command opens with a verb's bare form, not a subject."""
    if _STEP_START.match(sentence):
        return True
    words = _WORD.findall(sentence)
    if not words or not words[0][:1].isupper():
        return False
    first = words[0].lower()
    # "Pumps …", "Operators …": a plural subject; "Press", "Access" end in -ss and are verbs.
    plural = first.endswith("s") and not first.endswith("ss")
    return first not in _NOT_A_COMMAND and not plural and not first.endswith(("ed", "ing", "ly"))


def sentences(text: str) -> list[str]:
    """A passage's prose units (sentences, short blocks), without its code."""
    return [unit for unit, code in units(text) if not code]


def _pool(passages: Sequence[tuple[int, str]]) -> list[_Unit]:
    pool: list[_Unit] = []
    seen: set[str] = set()
    for n, text in passages:
        for position, (unit, code, paragraph) in enumerate(_paragraph_units(text)):
            key = " ".join(_WORD.findall(unit.lower()))
            if key in seen:
                continue  # overlapping chunks repeat sentences
            seen.add(key)
            pool.append(_Unit(n=n, position=position, text=unit, terms=terms(unit), code=code,
                              paragraph=paragraph))
    return pool


def _score(question: str, pool: list[_Unit]) -> None:
    query = set(terms(question))
    document_frequency = Counter(term for u in pool for term in set(u.terms))
    average_length = sum(len(u.terms) for u in pool) / len(pool) or 1.0
    for u in pool:
        counts = Counter(u.terms)
        score = 0.0
        for term in query:
            tf = counts.get(term, 0)
            if not tf:
                continue
            df = document_frequency[term]
            idf = math.log(1 + (len(pool) - df + 0.5) / (df + 0.5))
            # Code repeats identifiers; its length must not drown a clear sentence.
            length = min(len(u.terms), average_length) if u.code else len(u.terms)
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / average_length))
        # Passages arrive best first: a small prior keeps ties with the better passage.
        u.score = score / (1 + 0.1 * (u.n - 1))


def select_units(question: str, passages: Sequence[tuple[int, str]]) -> list[_Unit]:
    """The units that answer the question, in reading order: the best-scoring sentences and
    code blocks, each code block whole and with the sentence that introduces it."""
    pool = _pool(passages)
    if not pool:
        return []
    _score(question, pool)
    ranked = sorted((u for u in pool if u.score > 0), key=lambda u: (-u.score, u.n, u.position))
    if not ranked:
        # Nothing shares a word with the question: the retrieval still ranked the first
        # passage first, so its opening sentence is the best there is to show.
        first = next((u for u in pool if not u.code), pool[0])
        return [first]
    best = ranked[0].score
    chosen: list[_Unit] = []
    for u in ranked:
        if u.score < RELATIVE_CUTOFF * best or len(chosen) >= MAX_UNITS:
            break
        if u.code and sum(c.code for c in chosen) >= MAX_CODE_BLOCKS:
            continue
        chosen.append(u)
    # A code block comes with its introduction, and an introduction ("…like this:") with
    # the code it introduces.
    by_place = {(u.n, u.position): u for u in pool}
    for u in list(chosen):
        if u.code:
            intro = by_place.get((u.n, u.position - 1))
            if intro is not None and not intro.code and intro not in chosen:
                chosen.append(intro)
        elif u.text.endswith(":"):
            code = by_place.get((u.n, u.position + 1))
            if code is not None and code.code and code not in chosen:
                chosen.append(code)
    for u in list(chosen):
        if not u.code and _INSTRUCTION_START.search(u.text):
            chosen += [s for s in _steps_after(u, by_place) if s not in chosen]
    chosen.sort(key=lambda u: (u.n, u.position))
    return chosen


def _steps_after(start: _Unit, by_place: dict[tuple[int, int], _Unit]) -> list[_Unit]:
    """The rest of the procedure an instruction opens: the following sentences of its
    paragraph, all of them if the paragraph is short, else while they read as steps, within
    MAX_STEP_UNITS and MAX_STEP_CHARS."""
    rest: list[_Unit] = []
    position = start.position + 1
    while (u := by_place.get((start.n, position))) is not None and not u.code \
            and u.paragraph == start.paragraph:
        rest.append(u)
        position += 1
    short = len(rest) <= MAX_STEP_UNITS and sum(len(u.text) for u in rest) <= MAX_STEP_CHARS
    steps: list[_Unit] = []
    budget = MAX_STEP_CHARS
    for u in rest[:MAX_STEP_UNITS]:
        if not (short or _is_step(u.text)) or len(u.text) > budget:
            break
        steps.append(u)
        budget -= len(u.text)
    return steps


def select_sentences(question: str, passages: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """The chosen (passage number, text) pairs for the question, in reading order."""
    return [(u.n, u.text) for u in select_units(question, passages)]


def _fence(code: str) -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", code)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}\n{code}\n{fence}"


def extractive_answer(question: str, passages: Sequence[tuple[int, str]]) -> str:
    """The answer as Markdown: consecutive quoted sentences run together as a paragraph
    ending with its citation [n]; code blocks fenced and whole."""
    picked = select_units(question, passages)
    if not picked:
        return NO_PASSAGES
    blocks: list[str] = []
    paragraph: list[str] = []
    paragraph_n: int | None = None
    last: tuple[int, int] | None = None

    def flush() -> None:
        nonlocal paragraph, paragraph_n
        if paragraph:
            blocks.append(f"{' '.join(paragraph)} [{paragraph_n}]")
        paragraph, paragraph_n = [], None

    for u in picked:
        if u.code:
            cited = paragraph_n == u.n
            flush()
            blocks.append(_fence(u.text))
            if not cited:
                blocks.append(f"[{u.n}]")
            continue
        if paragraph_n is not None and last != (u.n, u.position - 1):
            flush()  # not the next sentence of the same passage: a paragraph of its own
        paragraph.append(u.text)
        paragraph_n = u.n
        last = (u.n, u.position)
    flush()
    return "\n\n".join(blocks)


class ExtractiveChat(ChatBackend):
    """Answers with sentences quoted from the passages in the prompt, each cited as [n]."""

    provider_name = "extractive"
    remote = False
    generative = False

    def __init__(self, *, model: str = "extractive", **options):
        super().__init__(model=model or "extractive", **options)

    async def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> AsyncGenerator[ChatDelta | ChatUsage, None]:
        """Yield the extracted answer word by word, then its (counted, free) usage."""
        text = extractive_answer(prompt.question,
                                 [(p.n, _SOURCE_NUMBERS.sub("", p.text)) for p in prompt.passages])
        pieces = re.findall(r"\s*\S+", text)
        if max_tokens is not None:
            pieces = self._within(pieces, max_tokens)
        for piece in pieces:
            yield ChatDelta(text=piece)
        output = "".join(pieces)
        yield ChatUsage(
            input_tokens=sum(self.count_tokens(m.content) for m in prompt.messages),
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

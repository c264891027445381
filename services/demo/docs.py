"""The demo bank's policy documents and a small, deterministic retriever over them.

The customer-support agent answers from these texts only: it picks the
paragraph sharing the most (IDF-weighted) words with the question. No model,
no network, same answer every run.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

__all__ = ["DOCUMENTS", "Document", "Passage", "retrieve", "tokens"]


@dataclass(frozen=True, slots=True)
class Document:
    """A policy document: an id, a title and paragraphs of text."""

    id: str
    title: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Passage:
    """A paragraph chosen to answer a question, with its overlap score."""

    document: Document
    text: str
    score: float
    matched: tuple[str, ...]


DOCUMENTS: tuple[Document, ...] = (
    Document(
        id="loan-policy",
        title="Personal Loan Policy",
        paragraphs=(
            "We lend between 1,000 and 50,000 for terms of 12 to 84 months. Every "
            "application is scored by our credit check and screened by fraud detection "
            "before a decision is made.",
            "Applications with a credit score of 680 or more and a debt-to-income ratio "
            "under 40% are approved automatically. Scores between 600 and 679 are "
            "referred to an underwriter, who decides within two business days.",
            "Applications are declined when the credit score is under 600, when the "
            "monthly repayments would take the debt-to-income ratio above 50%, or when "
            "fraud detection flags the application. A declined applicant may reapply "
            "after 90 days.",
            "The interest rate (APR) depends on the credit band: excellent 6.9%, good "
            "8.4%, fair 11.9%. The rate is fixed for the whole term of the loan.",
        ),
    ),
    Document(
        id="fee-schedule",
        title="Fee Schedule",
        paragraphs=(
            "There is no arrangement fee and no fee for paying off your loan early: you "
            "can repay part or all of the loan at any time without an early repayment "
            "charge, and you only pay interest up to the day you repay.",
            "A late payment fee of 12 is charged when a monthly repayment is more than "
            "14 days overdue. We never charge more than one late fee for the same month.",
            "Changing your repayment date is free once a year. Paper statements cost 2 "
            "per statement; online statements are free.",
        ),
    ),
    Document(
        id="data-privacy",
        title="Data Privacy Notice",
        paragraphs=(
            "We use your personal data to assess your application, prevent fraud and "
            "manage your loan. Your credit report is requested from a credit reference "
            "agency and is only seen by the credit check and the underwriter.",
            "We keep your application and credit report for six years after the loan is "
            "repaid, or for 12 months if the application is declined, as financial "
            "regulation requires. After that your data is deleted.",
            "You may ask for a copy of the personal data we hold about you, correct it, "
            "or object to its use, by writing to our data protection officer. We answer "
            "within 30 days.",
        ),
    ),
    Document(
        id="hardship",
        title="Financial Hardship Guide",
        paragraphs=(
            "If you cannot make a repayment, contact us before it is due. We can agree a "
            "payment holiday of up to three months or a lower monthly repayment for a "
            "while, and we will not charge late fees while the plan is in place.",
        ),
    ),
)

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    ("a", "an", "and", "any", "are", "as", "at", "be", "by", "can", "do", "does", "for",
     "from", "how", "i", "if", "in", "is", "it", "its", "me", "my", "of", "on", "or", "our",
     "so", "that", "the", "their", "them", "there", "this", "to", "up", "we", "what", "when",
     "where", "which", "who", "will", "with", "you", "your", "yours")
)  # fmt: skip


def _stem(word: str) -> str:
    # Just enough folding that "fees"/"fee" and "repaying"/"repay" meet.
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def tokens(text: str) -> list[str]:
    """Lower-cased, stemmed content words of ``text``."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


def _corpus() -> list[tuple[Document, str, Counter[str]]]:
    return [(doc, p, Counter(tokens(p))) for doc in DOCUMENTS for p in doc.paragraphs]


_PASSAGES = _corpus()
_DF: Counter[str] = Counter(t for _, _, words in _PASSAGES for t in set(words))


def retrieve(question: str) -> Passage | None:
    """The paragraph that best answers ``question``, or None if no word overlaps.

    Score: sum of the inverse document frequency of each question word found
    in the paragraph (rare words such as "early" weigh more than "loan").
    Ties go to the earlier paragraph, so the answer is deterministic.
    """
    asked = set(tokens(question))
    n = len(_PASSAGES)
    best: Passage | None = None
    for doc, text, words in _PASSAGES:
        matched = sorted(asked & words.keys())
        score = sum(math.log(1 + n / _DF[t]) for t in matched)
        if matched and (best is None or score > best.score):
            best = Passage(doc, text, round(score, 3), tuple(matched))
    return best

"""ROUGE-1/2/L and exact match, implemented here (no extra dependency).

Tokenization and scores follow Google's `rouge-score` package with `use_stemmer=False` (what
HF `evaluate`'s rouge uses by default): lowercase, every run of characters other than a-z/0-9
is a separator, so non-ASCII text has no tokens. ROUGE-N counts clipped n-gram matches;
ROUGE-L uses the longest common subsequence; each reports precision, recall and F1 (F1 is 0
when either side has no tokens). Corpus scores are means of the per-example F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _prf(matches: int, n_pred: int, n_ref: int) -> dict[str, float]:
    p = matches / n_pred if n_pred else 0.0
    r = matches / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f}


def rouge_n(prediction: str, reference: str, n: int) -> dict[str, float]:
    def grams(tokens: list[str]) -> Counter[tuple[str, ...]]:
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    pred, ref = grams(tokenize(prediction)), grams(tokenize(reference))
    matches = sum(min(c, ref[g]) for g, c in pred.items())
    return _prf(matches, sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    pred, ref = tokenize(prediction), tokenize(reference)
    return _prf(lcs_length(pred, ref), len(pred), len(ref))


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization for exact match: lowercase, drop punctuation and articles,
    collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """F1 of ROUGE-1/2/L and exact match of one prediction against its reference."""
    return {
        "rouge1": rouge_n(prediction, reference, 1)["f1"],
        "rouge2": rouge_n(prediction, reference, 2)["f1"],
        "rougeL": rouge_l(prediction, reference)["f1"],
        "exact_match": exact_match(prediction, reference),
    }


def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-example scores (0..1), plus the count."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    totals: Counter[str] = Counter()
    for pred, ref in zip(predictions, references):
        totals.update(score_pair(pred, ref))
    n = max(len(predictions), 1)
    return {**{k: v / n for k, v in totals.items()}, "samples": len(predictions)}

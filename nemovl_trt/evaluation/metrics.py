"""Each benchmark's own metric, as its authors define it.

- ANLS (DocVQA, InfoVQA; Biten et al. 2019, "Scene Text Visual Question Answering", §4): for one
  question, ``max over ground-truth answers g of s(p, g)`` with ``s = 1 - NL(p, g)`` when
  ``NL(p, g) < tau`` and ``0`` otherwise, ``NL`` the Levenshtein distance divided by the longer
  string's length, both strings lower-cased, stripped and with runs of whitespace collapsed; tau = 0.5.
  At exactly NL = 0.5 the score is 0 (the paper's "< tau").
- Relaxed accuracy (ChartQA; Masry et al. 2022, §5.1, after Methani et al. 2020): a numeric answer is
  correct when it is within 5 % of the gold number (``|p - g| / |g| <= 0.05``; a trailing ``%`` divides
  by 100 on either side); a non-numeric answer, or a gold number of 0, needs an exact (case-insensitive)
  match.
- Exact choice (AI2D, Video-MME): the option letter read from the answer equals the gold letter.
"""

from __future__ import annotations

import re

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _norm_text(s: str) -> str:
    return " ".join(str(s).strip().lower().split())


def normalized_levenshtein(pred: str, gold: str) -> float:
    """Levenshtein distance / length of the longer string, after ANLS normalization; 0 for two empties."""
    p, g = _norm_text(pred), _norm_text(gold)
    longest = max(len(p), len(g))
    return 0.0 if longest == 0 else levenshtein(p, g) / longest


def anls(pred: str, answers: list[str] | tuple[str, ...], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against its ground-truth answers (a score in [0, 1])."""
    if not answers:
        raise ValueError("ANLS needs at least one ground-truth answer")
    best = 0.0
    for gold in answers:
        nl = normalized_levenshtein(pred, gold)
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_number(text: str) -> float | None:
    s = str(text).strip()
    try:
        if s.endswith("%"):
            return float(s[:-1].strip()) / 100.0
        return float(s)
    except ValueError:
        return None


def relaxed_correct(pred: str, gold: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness of one prediction against one gold answer."""
    p, g = _to_number(pred), _to_number(gold)
    if p is not None and g is not None and g != 0:
        return abs(p - g) / abs(g) <= tolerance
    return str(pred).strip().lower() == str(gold).strip().lower()


def relaxed_accuracy(pred: str, answers: list[str] | tuple[str, ...],
                     tolerance: float = RELAXED_TOLERANCE) -> float:
    """1.0 when the prediction is relaxed-correct against any gold answer, else 0.0."""
    if not answers:
        raise ValueError("relaxed accuracy needs a gold answer")
    return 1.0 if any(relaxed_correct(pred, g, tolerance) for g in answers) else 0.0


_LETTER_PATTERNS = (
    re.compile(r"^\(?([A-Z])\)?(?:[.:)\]]|\s|$)"),  # "B", "B.", "(B)", "B) text", "B: text"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?\b", re.IGNORECASE),
)


def extract_choice(text: str, options: list[str] | tuple[str, ...]) -> str | None:
    """The option letter an answer names, or None.

    Read in this order (after dropping a leading ``Answer:`` / ``The answer is``): the whole answer
    equal (case-insensitive, trailing punctuation ignored) to one option's text, with or without its
    ``"B. "`` label; a leading letter (``B``, ``B.``, ``(B)``, ``B) …``); ``answer is B`` / ``option: B``
    anywhere. Only letters of existing options count.
    """
    valid = LETTERS[:len(options)]
    s = str(text).strip()
    s = re.sub(r"^(?:the\s+)?(?:best\s+)?answer\s*(?:is)?\s*:?\s*", "", s, flags=re.IGNORECASE) or s
    want = s.lower().rstrip(".!?,;:").strip()
    for letter, option in zip(valid, options, strict=False):  # the whole answer is an option's text
        body = _option_body(option)
        if want and want in (str(option).strip().lower().rstrip("."), body.lower().rstrip(".")):
            return letter
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(s)
        if m:
            letter = m.group(1).upper()
            if letter in valid:
                return letter
    return None


def _option_body(option: str) -> str:
    """An option's text without a leading ``"B. "`` / ``"(B) "`` label."""
    return re.sub(r"^\(?[A-Z]\)?[.:)]\s*", "", str(option).strip())


def exact_choice(pred: str, gold_letter: str, options: list[str] | tuple[str, ...]) -> float:
    """1.0 when the letter read from `pred` is `gold_letter`, else 0.0."""
    return 1.0 if extract_choice(pred, options) == gold_letter.strip().upper() else 0.0


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96); (0, 0) for n = 0."""
    if n <= 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval of a mean of scores in [0, 1] (clipped to [0, 1])."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * (var / n) ** 0.5
    return (max(0.0, mean - half), min(1.0, mean + half))

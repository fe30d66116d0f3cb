"""When does a model's answer already say what a correction wants? Normalised exact match."""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”«»–—…")


def normalize_answer(text: str) -> str:
    """Lower case, without punctuation, articles (a, an, the) and repeated whitespace, as SQuAD scores."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answers_match(model_answer: str, expected: str) -> bool:
    """The normalised model answer is the expected one, or starts with it and then goes on to new words.

    A language model does not stop after the answer ("Paris, the capital..."), so the continuation
    counts when its first words are exactly the answer.
    """
    said, wanted = normalize_answer(model_answer), normalize_answer(expected)
    return bool(wanted) and (said == wanted or said.startswith(wanted + " "))

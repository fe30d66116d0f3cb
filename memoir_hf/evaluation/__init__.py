"""The paper's evaluation protocol: benchmark loaders, metrics, the harness (:func:`run`) and its plots."""

from .datasets import FORMATS, DataError, EvalRecord, load_many, load_records, load_texts
from .harness import METHODS, run, superseded

__all__ = ["FORMATS", "METHODS", "DataError", "EvalRecord", "load_many", "load_records", "load_texts", "run",
           "superseded"]

"""The paper protocol: T sequential edits, then one evaluation of everything after the last edit.

Each prompt set (edit prompts, rephrases, loc prompts) is scored twice after the edits: routed to
its nearest edit, and with the memory off (which, by the zero-impact guarantee, is the unedited
model). A threshold τ then decides per prompt which of the two it gets, so Rel/Gen/Loc at any τ
(the calibrated one, and a whole sweep) come from the same two passes, exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..config import MemoirConfig
from ..editing.inputs import Fact
from ..errors import MemoirConfigError, MemoirError
from ..model import MemoirModel, patch
from ..offline_models import load_model, recorded_source
from ..patching.target import find_target
from ..persistence.atomic import atomic_file, recover_interrupted_swap
from ..persistence.checkpoint import is_checkpoint
from .datasets import EvalRecord, load_many
from .metrics import agreement, mean, perplexity, token_accuracy
from .scoring import Scored, score_pairs

METHODS = ("memoir", "ft-l")
SWEEP = tuple(round(t, 2) for t in np.arange(0.30, 1.001, 0.02))


def run(model: str | tuple[Any, Any], data: str | os.PathLike | Sequence[str | os.PathLike], *, format: str = "zsre",
        edits: int = 100,
        method: str = "memoir", config: MemoirConfig | None = None, threshold: float | None = None,
        out: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100, progress: bool = True,
        strict_data: bool = False, calibration_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Edit ``edits`` records of ``data`` one after another, then evaluate; returns (and writes) the report.

    ``data`` is one file or several of the same format, edited in the order given (to go beyond the
    size of one file, e.g. the ZsRE edit set followed by ZsRE train records).

    ``model`` is a built-in name (smollm2, gemma3-270m), a local path or Hub id, or a (model,
    tokenizer) pair. ``threshold`` None calibrates τ with ``calibrate_threshold`` (memoir only) against
    ``calibration_texts`` (default: the generic prompts shipped with memoir_hf; never the test set).
    With ``checkpoint_dir``, the memory is saved every ``checkpoint_every`` edits and a rerun resumes.
    """
    _check_arguments(method, edits, threshold, checkpoint_every, out, plot, checkpoint_dir, calibration_texts)
    started = time.perf_counter()
    records = load_many(data, format, limit=edits, strict=strict_data)
    if len(records) < edits:
        warnings.warn(f"the data holds {len(records)} usable records, fewer than the {edits} edits asked for: "
                      f"evaluating T = {len(records)}.", stacklevel=2)
    if calibration_texts is not None:
        calibration_texts = _without_run_prompts(calibration_texts, records)
    _warn_if_config_threshold_is_calibrated_away(config, method, threshold)
    base, tokenizer = load_model(model) if isinstance(model, str) else model
    memoir = _memoir(base, tokenizer, method, config, checkpoint_dir, records)
    if isinstance(model, str):  # so that the checkpoints it saves name their base, as the CLI's do
        memoir.base_model_source = recorded_source(model)
    try:
        _check_records_fit(memoir, records)
        if calibration_texts is not None:
            memoir._check_fit([tokenizer(text)["input_ids"] for text in calibration_texts], "calibration texts")
        report = _edit_and_evaluate(memoir, records, format, method, threshold, checkpoint_dir, checkpoint_every,
                                    progress, calibration_texts)
    finally:
        memoir.unpatch()
    report.update({"model": model if isinstance(model, str) else type(base).__name__,
                   "data": str(data) if isinstance(data, (str, os.PathLike)) else [str(d) for d in data],
                   "format": format, "wall_seconds": time.perf_counter() - started})
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)  # made before editing; gone since?
        with atomic_file(out) as temporary:
            temporary.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if plot is not None and report["sweep"]:
        from .plots import plot_sweep

        plot_sweep(report, plot)
    return report


def _check_arguments(method: str, edits: int, threshold: float | None, checkpoint_every: int,
                     out: str | os.PathLike | None, plot: str | os.PathLike | None,
                     checkpoint_dir: str | os.PathLike | None, calibration_texts: Sequence[str] | None) -> None:
    """Everything that can be refused is refused before the first (slow) edit."""
    if method not in METHODS:
        raise MemoirError(f"method must be one of {METHODS}, got {method!r}.")
    if edits < 1:
        raise MemoirError(f"edits must be at least 1, got {edits}.")
    if checkpoint_every < 1:
        raise MemoirError(f"checkpoint_every must be at least 1, got {checkpoint_every}.")
    if threshold is not None and method == "ft-l":
        raise MemoirError("ft-l has no routing, so no threshold: drop --threshold for --method ft-l.")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise MemoirConfigError(f"threshold must be in [0, 1], got {threshold}.")
    if isinstance(calibration_texts, (str, bytes)) or (calibration_texts is not None and not all(
            isinstance(text, str) and text.strip() for text in calibration_texts)):
        raise MemoirError("calibration_texts must be a list of non-empty strings (for a file, read it with "
                          "memoir_hf.evaluation.datasets.load_texts).")
    if calibration_texts is not None and (method == "ft-l" or threshold is not None):
        raise MemoirError("calibration texts only serve to calibrate τ, which "
                          + ("ft-l does not have" if method == "ft-l" else "--threshold already sets")
                          + ": drop --calibration-texts.")
    if checkpoint_dir is not None:
        _check_writable("checkpoint_dir", Path(checkpoint_dir), folder=True)
    for name, path in (("out", out), ("plot", plot)):
        if path is not None:
            _check_writable(name, Path(path))
    if plot is not None and method == "ft-l":
        raise MemoirError("ft-l has no routing, so no τ sweep to plot: drop --plot for --method ft-l.")
    if plot is not None:
        _check_plot_format(Path(plot))


def _check_plot_format(plot: Path) -> None:
    try:
        import matplotlib  # noqa: F401 - first, so that a matplotlib hidden from sys.modules counts as absent
        from matplotlib.figure import Figure
    except ImportError:
        raise MemoirError("--plot needs matplotlib: pip install matplotlib (or memoir-hf[plot]), "
                          "or drop --plot.") from None
    formats = Figure().canvas.get_supported_filetypes()
    if plot.suffix and plot.suffix[1:].lower() not in formats:
        raise MemoirError(f"cannot draw {plot}: matplotlib writes {', '.join(sorted(formats))}; use one of "
                          "those suffixes (or none, for PNG).")


def _warn_if_config_threshold_is_calibrated_away(config: MemoirConfig | None, method: str,
                                                 threshold: float | None) -> None:
    """A τ set in the config (or MEMOIR_THRESHOLD) would be replaced by the calibrated one: say so."""
    default = MemoirConfig().threshold
    if method == "memoir" and threshold is None and config is not None and config.threshold != default:
        warnings.warn(f"the config's threshold {config.threshold} is not used: τ is calibrated. Pass "
                      f"threshold={config.threshold} (--threshold {config.threshold}) to evaluate at it.",
                      stacklevel=3)


def _check_writable(name: str, path: Path, *, folder: bool = False) -> None:
    """What the run writes hours from now (report, plot, checkpoint folder) must be writable: check now."""
    if path.is_dir() and not folder:
        raise MemoirError(f"{name} {path} is a folder; give a file name.")
    if path.exists() and not path.is_dir() and folder:
        raise MemoirError(f"{name} {path} is a file; give a folder path.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MemoirError(f"cannot create the folder of {name} {path}: {error.strerror}.") from None
    if not os.access(path.parent, os.W_OK):
        raise MemoirError(f"cannot write {name} {path}: its folder is not writable.")


def _without_run_prompts(texts: Sequence[str], records: Sequence[EvalRecord]) -> list[str]:
    """Calibration texts minus the run's own prompts: calibrating on the test set would leak it.

    A locality prompt is matched alone and followed by its answer (as WISE writes its irrelevant
    samples), which is how ZsRE train loc prompts reappear when train records are edited too.
    """
    own = {r.prompt.strip() for r in records} | {r.rephrase.strip() for r in records if r.rephrase}
    own |= {r.loc.strip() for r in records if r.loc} | {f"{r.loc} {r.loc_ans}".strip() for r in records if r.loc}
    kept = [text for text in texts if text.strip() not in own]
    if not kept:
        raise MemoirError("every calibration text is a prompt of this run; calibrate on unrelated text (a train "
                          "split's locality prompts, or none for the shipped generic prompts).")
    if len(kept) < len(texts):
        warnings.warn(f"{len(texts) - len(kept)} calibration text(s) are prompts of this run (its edit, rephrase "
                      "or locality prompts) and were left out of the calibration.", stacklevel=3)
    return kept


def _edit_and_evaluate(memoir: MemoirModel, records: Sequence[EvalRecord], format: str, method: str,
                       threshold: float | None, checkpoint_dir: str | os.PathLike | None, checkpoint_every: int,
                       progress: bool, calibration_texts: Sequence[str] | None) -> dict[str, Any]:
    seconds = _apply_edits(memoir, records, checkpoint_dir, checkpoint_every, progress)
    calibration = None
    if method == "memoir":
        if threshold is None:
            calibration = dataclasses.asdict(memoir.calibrate_threshold(calibration_texts))
        else:
            memoir.memoir_config.threshold = threshold
    scores = _score_everything(memoir, records)
    tau = memoir.memoir_config.threshold
    classes = _routing_classes(scores, records, memoir, tau) if method == "memoir" else None
    return {
        "library_version": __version__, "method": method, "edits": len(records),
        "memoir_config": memoir.memoir_config.to_dict(), "patched_module": memoir.target.module_name,
        "threshold": tau, "calibration": calibration,
        "metrics": _metrics(scores, tau),
        "unedited": _metrics(scores, tau=2.0),
        "edit_success_rate": mean([float(r.success) for r in memoir.edits]),
        "seconds_per_edit": mean(seconds),
        "steps_per_edit": _mean_steps(memoir),
        "peak_rss_mb": _peak_rss_mb(),
        "routing": _routing_confusion(classes) if classes else None,
        "accuracy_by_routing": _accuracy_by_routing(scores, classes, tau) if classes else None,
        # Same-subject records are contradicting versions of one question in ZsRE only: in CounterFact they
        # are other relations of the subject, in the hallucination set successive sentences of one passage.
        "by_conflict": _by_conflict(scores, records, tau) if format == "zsre" else None,
        "sweep": [{"threshold": t, **_metrics(scores, t)} for t in SWEEP] if method == "memoir" else None,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform()},
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _mean_steps(memoir: MemoirModel) -> float | None:
    """Mean optimiser steps of the edits that logged them (a run resumed from an older checkpoint may not)."""
    steps = [float(e.metadata["steps"]) for e in memoir.edits if "steps" in e.metadata]
    return mean(steps) if steps else None


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process (None where the platform does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _memoir(base: Any, tokenizer: Any, method: str, config: MemoirConfig | None,
            checkpoint_dir: str | os.PathLike | None, records: Sequence[EvalRecord]) -> MemoirModel:
    # An evaluation never removes an edit: do not keep a d_model x k delta per edit in memory and on disk.
    config = dataclasses.replace(config or MemoirConfig(), keep_edit_deltas=False)
    if method == "ft-l":
        # Fine-tuning the same down projection: every column, memory always on (no mask, no routing).
        d_ff = find_target(base, config).d_ff
        config = dataclasses.replace(config, top_k=d_ff, threshold=0.0)
    if checkpoint_dir is not None:
        recover_interrupted_swap(checkpoint_dir)
    if checkpoint_dir is None or not is_checkpoint(checkpoint_dir):
        return patch(base, config, tokenizer=tokenizer)
    module = find_target(base, config).module_name
    memoir = MemoirModel.from_pretrained(base, checkpoint_dir, tokenizer)
    memoir.memoir_config.keep_edit_deltas = False
    done = [(e.prompt, e.target) for e in memoir.edits]
    saved, wanted = (_run_settings(c) for c in (memoir.memoir_config, config))
    if saved != wanted or memoir.target.module_name != module \
            or done != [(r.prompt, r.target) for r in records[:len(done)]]:
        memoir.unpatch()
        raise MemoirError(f"{checkpoint_dir} holds a run with other edits or settings (method, config, layer or "
                          "--edits); resume with the same command, or use a fresh checkpoint_dir.")
    return memoir


def _check_records_fit(memoir: MemoirModel, records: Sequence[EvalRecord]) -> None:
    """Refuse, before the first edit, a record whose prompt, rephrase or loc pair the model cannot read."""
    for record in records:
        pairs = {"prompt": (record.prompt, record.target), "rephrase": (record.rephrase, record.target),
                 "loc": (record.loc, record.loc_ans)}
        for field, (prompt, answer) in pairs.items():
            if prompt is not None:  # the check every edit makes, on every pair the run will score
                memoir._encode(Fact(prompt, answer, {}), where=f"record {record.index} ({field} {prompt!r}): ")


def _run_settings(config: MemoirConfig) -> dict[str, Any]:
    """The settings a resumed run must share (τ is set after editing; the layer is saved by name)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("threshold", "layer", "keep_edit_deltas")}


def _apply_edits(memoir: MemoirModel, records: Sequence[EvalRecord], checkpoint_dir: str | os.PathLike | None,
                 checkpoint_every: int, progress: bool) -> list[float]:
    """Edit the records not edited yet; the seconds of every edit that has them (resumed ones may not)."""
    _check_unchecked_edits(memoir)
    done = len(memoir.edits)
    seconds = [float(e.metadata["seconds"]) for e in memoir.edits if "seconds" in e.metadata]
    bar = tqdm(records[done:], desc="edits", unit="edit", initial=done, total=len(records), disable=not progress)
    for record in bar:
        try:
            result = memoir.edit(record.prompt, record.target, metadata={"eval_index": record.index})
            if result.error is not None:
                raise MemoirError(f"record {record.index} ({record.prompt!r}) could not be edited after {done} "
                                  f"edits: {result.error}. Change the settings, or leave the record out of the data.")
            done += 1
            memoir.store.records[-1].metadata.update(seconds=round(result.seconds, 4), steps=result.steps)
            seconds.append(result.seconds)
            bar.set_postfix(success=f"{mean([float(e.success) for e in memoir.store.records]):.2f}")
            if done % checkpoint_every == 0 or done == len(records):
                _save_checkpoint(memoir, checkpoint_dir)
        except BaseException:
            # Keep the edits since the last checkpoint, which on a long run can be an hour of work, whatever
            # stopped the run (Ctrl-C, an error, even during a checkpoint save, which is atomic). Ctrl-C leaves
            # the memory as it was before this edit, unless it came during the success check that follows
            # the write: then the edit is stored, and its success is checked when the run resumes.
            if len(memoir.edits) > done:
                memoir.store.records[-1].metadata[UNCHECKED] = True
            try:
                _save_checkpoint(memoir, checkpoint_dir)
            except Exception as save_error:  # report what stopped the run, not the failed rescue
                warnings.warn(f"the edits since the last checkpoint could not be saved: {save_error}", stacklevel=2)
            raise
    return seconds


UNCHECKED = "success_unchecked"
"""Metadata key of an edit stored by an interrupted run before its success was checked."""


def _check_unchecked_edits(memoir: MemoirModel) -> None:
    """Check, as the edit itself would have, the success of edits that an interruption left unchecked."""
    unchecked = [record for record in memoir.store.records if record.metadata.pop(UNCHECKED, False)]
    scored = score_pairs(memoir, [(record.prompt, record.target) for record in unchecked])
    for record, score in zip(unchecked, scored, strict=True):
        record.success = token_accuracy(score.predicted, score.target) == 1.0


def _save_checkpoint(memoir: MemoirModel, checkpoint_dir: str | os.PathLike | None) -> None:
    if checkpoint_dir is not None:
        memoir.save_pretrained(checkpoint_dir)


@dataclasses.dataclass
class _Scores:
    """For each prompt set: scores routed to the nearest edit, and with the memory off."""

    routed: dict[str, list[Scored]]
    off: dict[str, list[Scored]]


def _score_everything(memoir: MemoirModel, records: Sequence[EvalRecord]) -> _Scores:
    sets = {"rel": [(r.prompt, r.target) for r in records],
            "gen": [(r.rephrase, r.target) for r in records if r.rephrase is not None],
            "loc": [(r.loc, r.loc_ans) for r in records if r.loc is not None]}
    with _threshold(memoir, 0.0):
        routed = {name: score_pairs(memoir, pairs) for name, pairs in sets.items()}
    with memoir.disable_memory():
        off = {name: score_pairs(memoir, pairs) for name, pairs in sets.items()}
    return _Scores(routed, off)


@contextmanager
def _threshold(memoir: MemoirModel, value: float) -> Iterator[None]:
    previous = memoir.memoir_config.threshold
    memoir.memoir_config.threshold = value
    try:
        yield
    finally:
        memoir.memoir_config.threshold = previous


def _chosen(scores: _Scores, name: str, tau: float) -> list[Scored]:
    """Per prompt, the routed score when its nearest edit overlaps >= τ, else the memory-off score."""
    return [routed if routed.routing is not None and routed.routing.overlap >= tau else off
            for routed, off in zip(scores.routed[name], scores.off[name], strict=True)]


def _metrics(scores: _Scores, tau: float) -> dict[str, float]:
    rel = _chosen(scores, "rel", tau)
    metrics = {"rel": mean([token_accuracy(s.predicted, s.target) for s in rel]),
               "rel_ppl": mean([perplexity(s.token_nll) for s in rel])}
    if scores.routed["gen"]:
        gen = _chosen(scores, "gen", tau)
        metrics["gen"] = mean([token_accuracy(s.predicted, s.target) for s in gen])
        metrics["gen_ppl"] = mean([perplexity(s.token_nll) for s in gen])  # the temporal set's ood_ppl
    if scores.routed["loc"]:
        metrics["loc"] = mean([agreement(before.predicted, after.predicted)
                               for before, after in zip(scores.off["loc"], _chosen(scores, "loc", tau), strict=True)])
    return metrics


ROUTING_CLASSES = ("own_edit", "other_edit_same_subject", "other_edit", "no_edit")


def _routing_classes(scores: _Scores, records: Sequence[EvalRecord], memoir: MemoirModel,
                     tau: float) -> dict[str, list[str]]:
    """Per prompt of each set, one of ROUTING_CLASSES: its own edit, another edit (same subject or not), or none."""
    subject_of_index = {r.index: r.subject for r in records}
    index_of_edit = {e.edit_id: e.metadata.get("eval_index") for e in memoir.store.records}
    owners = {"rel": list(records), "gen": [r for r in records if r.rephrase is not None],
              "loc": [r for r in records if r.loc is not None]}
    classes = {}
    for name, routed in scores.routed.items():
        classes[name] = []
        for record, score in zip(owners[name], routed, strict=True):
            decision = score.routing
            if decision is None or decision.overlap < tau:
                kind = "no_edit"
            elif name == "loc":
                kind = "other_edit"  # a loc prompt is about none of the edits
            elif index_of_edit[decision.nearest_edit_id] == record.index:
                kind = "own_edit"
            elif record.subject is not None and \
                    subject_of_index.get(index_of_edit[decision.nearest_edit_id]) == record.subject:
                kind = "other_edit_same_subject"
            else:
                kind = "other_edit"
            classes[name].append(kind)
    return classes


def _routing_confusion(classes: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """How many prompts of each set read their own edit, another edit (same subject or not), or none."""
    return {name: {kind: kinds.count(kind) for kind in ROUTING_CLASSES} for name, kinds in classes.items()}


def _accuracy_by_routing(scores: _Scores, classes: dict[str, list[str]], tau: float) -> dict[str, Any]:
    """Rel and Gen of the prompts of each routing class (None for an empty one): what routing leaves to the memory."""
    split = {}
    for name in ("rel", "gen"):
        accuracy = [token_accuracy(s.predicted, s.target) for s in _chosen(scores, name, tau)]
        split[name] = {kind: _mean_or_none([a for a, k in zip(accuracy, classes[name], strict=True) if k == kind])
                       for kind in ROUTING_CLASSES}
    return split


def superseded(records: Sequence[EvalRecord]) -> list[bool]:
    """Per record: whether a later record of the same subject asks for another target.

    The protocol edits every record, so such a later edit, whose mask shares much of the earlier
    one's (same subject), trains those columns toward a different answer: a conflict in the data
    that no router can resolve from the question alone.
    """
    later_targets: dict[str, set[str]] = {}
    flags = []
    for record in reversed(records):
        targets = later_targets.setdefault(record.subject, set()) if record.subject is not None else set()
        flags.append(bool(targets - {record.target}))
        targets.add(record.target)
    return flags[::-1]


def _by_conflict(scores: _Scores, records: Sequence[EvalRecord], tau: float) -> dict[str, Any]:
    """Rel and Gen of the superseded records and of the others: how much of the loss the data's conflicts explain."""
    flags = superseded(records)
    split = {"superseded_records": sum(flags)}
    with_rephrase = [flag for flag, record in zip(flags, records, strict=True) if record.rephrase is not None]
    for name, marks in (("rel", flags), ("gen", with_rephrase)):
        accuracy = [token_accuracy(s.predicted, s.target) for s in _chosen(scores, name, tau)]
        split[name] = {"superseded": _mean_or_none([a for a, m in zip(accuracy, marks, strict=True) if m]),
                       "others": _mean_or_none([a for a, m in zip(accuracy, marks, strict=True) if not m])}
    return split


def _mean_or_none(values: list[float]) -> float | None:
    """None for an empty group: a report is JSON, which has no NaN."""
    return mean(values) if values else None

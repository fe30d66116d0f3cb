"""Plots of evaluation reports (needs matplotlib: pip install memoir_hf[plot])."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import DEFAULT_AGGREGATION, DEFAULT_TOP_K
from ..errors import MemoirError
from ..persistence.atomic import atomic_file

_CURVES = (("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"))
_LINES = ("-", ":", "--", "-.", (0, (1, 3)), (0, (5, 1)))
_MARKERS = "osD^vP"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MemoirError("plots need matplotlib: pip install 'memoir_hf[plot]'") from None
    return plt


def plot_sweep(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Rel/Gen/Loc against the routing threshold τ, with the τ the run used."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    taus = [row["threshold"] for row in report["sweep"]]
    for key, label in _CURVES:
        if key in report["sweep"][0]:
            axis.plot(taus, [row[key] for row in report["sweep"]], marker=".", label=label)
    axis.axvline(report["threshold"], color="grey", linestyle="--", label=f"τ = {report['threshold']:.3f}")
    axis.set(xlabel="routing threshold τ", ylabel="score", ylim=(-0.02, 1.02),
             title=f"{report['model']} · {report['format']} · T = {report['edits']}")
    axis.legend(loc="lower left")
    figure.tight_layout()
    _save(plt, figure, path)


def plot_scaling(reports: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Rel/Gen/Loc against the number of sequential edits T, one line per method and mask/step setting."""
    plt = _pyplot()
    _save(plt, scaling_figure(plt, reports), path)


def scaling_figure(plt: Any, reports: Sequence[dict[str, Any]]) -> Any:
    """The figure of :func:`plot_scaling`: colour tells the metric, line style and marker the series, each
    in its own legend, so that the legend grows by one entry a series, not three."""
    from matplotlib.lines import Line2D

    series: dict[str, list[dict[str, Any]]] = {}
    for report in reports:
        series.setdefault(series_label(report), []).append(report)
    figure, axis = plt.subplots(figsize=(8.5, max(4.0, 1.5 + 0.22 * len(series))))
    series_handles = []
    for number, (name, rows) in enumerate(sorted(series.items(), key=lambda item: item[0] != "memoir")):
        rows.sort(key=lambda r: r["edits"])
        style = series_style(number)
        for colour, (key, _) in enumerate(_CURVES):
            measured = [r for r in rows if key in r["metrics"]]
            if measured:
                axis.plot([r["edits"] for r in measured], [r["metrics"][key] for r in measured], color=f"C{colour}",
                          **style)
        series_handles.append(Line2D([], [], color="dimgrey", label=name, **style))
    axis.set(xscale="log", xlabel="sequential edits T", ylabel="score", ylim=(-0.02, 1.02),
             title=f"{reports[0]['model']} · {reports[0]['format']}")
    metrics = [key for key, _ in _CURVES if any(key in r["metrics"] for r in reports)]
    axis.add_artist(axis.legend(handles=[Line2D([], [], color=f"C{colour}", label=label)
                                         for colour, (key, label) in enumerate(_CURVES) if key in metrics],
                                loc="center left", fontsize="small"))
    axis.legend(handles=series_handles, fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    return figure


def series_style(number: int) -> dict[str, Any]:
    """Line style and marker of the ``number``-th series: no two of the first 36 series look alike (the
    marker moves on by one each time the line styles wrap around)."""
    return {"linestyle": _LINES[number % len(_LINES)],
            "marker": _MARKERS[(number + number // len(_LINES)) % len(_MARKERS)]}


def series_label(report: dict[str, Any]) -> str:
    """The method, and for MEMOIR runs off the paper's settings the mask size, step budget and aggregation
    that tell them apart."""
    config = report.get("memoir_config") or {}
    if report["method"] != "memoir":
        return report["method"]
    parts = []
    if config.get("top_k", DEFAULT_TOP_K) != DEFAULT_TOP_K:
        parts.append(f"k={config['top_k']:g}, {config.get('max_steps')} steps")
    parts += write_settings(config)
    return f"memoir {', '.join(parts)}" if parts else "memoir"


def write_settings(config: dict[str, Any]) -> list[str]:
    """The fingerprint and write settings of a report's MemoirConfig that are off the paper's, as labels."""
    labels = []
    if config.get("aggregation", DEFAULT_AGGREGATION) != DEFAULT_AGGREGATION:
        labels.append(config["aggregation"])
    if config.get("protect_earlier_edits"):
        labels.append(f"protect {config['protect_earlier_edits']:g}")
        if config.get("unprotected_steps"):
            steps = config["unprotected_steps"]
            labels.append(f"{steps} unprotected step{'s' if steps > 1 else ''}")
    if config.get("weight_decay") == 0:
        labels.append("no weight decay")
    return labels


def _save(plt: Any, figure: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.suffix:  # as matplotlib itself would name it (the temporary file's suffix sets the format)
        path = path.with_suffix(".png")
    try:
        with atomic_file(path) as temporary:
            figure.savefig(temporary, dpi=120, bbox_inches="tight")  # the legend beside the axis too
    finally:
        plt.close(figure)

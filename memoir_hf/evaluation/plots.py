"""Plots of evaluation reports (needs matplotlib: pip install memoir_hf[plot])."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..errors import MemoirError

_CURVES = (("rel", "Rel"), ("gen", "Gen"), ("loc", "Loc"))


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
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_scaling(reports: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Rel/Gen/Loc against the number of sequential edits T, one line per method."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in reports}, key=lambda m: m != "memoir"):
        rows = sorted((r for r in reports if r["method"] == method), key=lambda r: r["edits"])
        style = {"linestyle": "-", "marker": "o"} if method == "memoir" else {"linestyle": ":", "marker": "s"}
        for colour, (key, label) in enumerate(_CURVES):
            if key in rows[0]["metrics"]:
                axis.plot([r["edits"] for r in rows], [r["metrics"][key] for r in rows], color=f"C{colour}",
                          label=f"{method} {label}", **style)
    axis.set(xscale="log", xlabel="sequential edits T", ylabel="score", ylim=(-0.02, 1.02),
             title=f"{reports[0]['model']} · {reports[0]['format']}")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

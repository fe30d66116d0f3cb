"""Print the evaluation results under benchmarks/results/ as a markdown table and plot Rel/Gen/Loc against T.

    python benchmarks/summarize_results.py [--plot benchmarks/results/zsre_smollm2.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memoir_hf.evaluation.plots import write_settings

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("model", "format", "method", "k/d_ff, lr, steps", "T", "τ", "Rel", "Gen", "Loc", "success", "s/edit",
           "peak MB",
           "Gen routed: own / same subject / other / none", "Loc routed to an edit",
           "Rel superseded / others (superseded records)")


def load_reports(folder: Path = RESULTS) -> list[dict]:
    reports = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    return sorted((r for r in reports if "metrics" in r),
                  key=lambda r: (r["model"], r["format"], r["method"], settings(r), r["edits"]))


def settings(report: dict) -> str:
    """The settings that set runs of one method apart: mask size (fraction of d_ff, or columns), lr, steps,
    and the aggregation and write protection when they are not the paper's."""
    config = report["memoir_config"]
    top_k = config["top_k"] if isinstance(config["top_k"], int) else format(config["top_k"], ".3g")
    return ", ".join([f"{top_k}, {config['learning_rate']:g}, {config['max_steps']}", *write_settings(config)])


def row(report: dict) -> list[str]:
    metrics, routing = report["metrics"], report.get("routing") or {}
    gen = routing.get("gen")
    gen_routing = (f"{gen['own_edit']} / {gen['other_edit_same_subject']} / {gen['other_edit']} / {gen['no_edit']}"
                   if gen and sum(gen.values()) else "–")  # no rephrases (hallucination): nothing routed
    loc = routing.get("loc")
    loc_routed = f"{loc['other_edit']} of {sum(loc.values())}" if loc else "–"
    conflict = report.get("by_conflict")
    by_conflict = (f"{_maybe(conflict['rel']['superseded'])} / {_maybe(conflict['rel']['others'])} "
                   f"({conflict['superseded_records']})" if conflict else "–")
    return [report["model"], report["format"], report["method"], settings(report), str(report["edits"]),
            f"{report['threshold']:.3f}",
            f"{metrics['rel']:.3f}", _maybe(metrics.get("gen")), _maybe(metrics.get("loc")),
            f"{report['edit_success_rate']:.2f}", f"{report['seconds_per_edit']:.1f}", f"{report['peak_rss_mb']:.0f}",
            gen_routing, loc_routed, by_conflict]


def _maybe(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(reports: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in reports]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plot", default=None, help="write Rel/Gen/Loc against T for the ZsRE SmolLM2 runs here")
    args = parser.parse_args()
    reports = load_reports()
    print(markdown(reports))
    if args.plot:
        from memoir_hf.evaluation.plots import plot_scaling

        zsre = [r for r in reports if r["model"] == "smollm2" and r["format"] == "zsre"]
        if not zsre:
            raise SystemExit(f"no SmolLM2 ZsRE report under {RESULTS} to plot.")
        plot_scaling(zsre, args.plot)


if __name__ == "__main__":
    main()

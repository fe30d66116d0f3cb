"""Where an edit's arithmetic goes, on each edit path, and the speedup that arithmetic allows.

Counts floating-point operations (``torch.utils.flop_counter``, matrix products and attention) of one
ZsRE edit on SmolLM2-135M, split by phase: the prompt's fingerprint, the one pass below the memory
(cached path only), the forward and the backward of an optimisation step, and the success check. The
edits run a fixed number of steps (``stop_loss`` 0) so that phases compare. Timings on a shared machine
are noisy; operation counts are not, so the ratio of the two paths' counts at the step count
``bench_edit.py`` measured is the speedup the cached path could reach at equal arithmetic throughput.

    python benchmarks/flops_edit.py              # ~2 minutes on 1 core
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from _common import RESULTS, ZSRE_EDITS, machine, markdown_table, parse_args, write_report

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("fingerprint", "pass below the memory", "step forward", "step backward", "success check")


def counted(counts: dict[str, float], label: str, function: Callable) -> Callable:
    """``function``, adding the GFLOP of each call to ``counts[label]``."""
    from torch.utils.flop_counter import FlopCounterMode

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            result = function(*args, **kwargs)
        counts[label] = counts.get(label, 0.0) + counter.get_total_flops() / 1e9
        return result
    return wrapper


def phases_of_one_edit(memoir, prompt: str, target: str, steps: int) -> dict[str, float]:
    """GFLOP per phase of one edit run for exactly ``steps`` steps (the step phases per step)."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    import memoir_hf.editing.prefix_cache as prefix_cache
    import memoir_hf.editing.trainer as trainer

    counts: dict[str, float] = {}
    model_class = type(memoir)
    patches = [mock.patch.object(model_class, "_fingerprint", counted(counts, "fingerprint", model_class._fingerprint)),
               mock.patch.object(model_class, "_check_edit", counted(counts, "success check", model_class._check_edit)),
               mock.patch.object(prefix_cache, "capture_down_proj_inputs",
                                 counted(counts, "pass below the memory", prefix_cache.capture_down_proj_inputs)),
               mock.patch.object(trainer, "target_loss", counted(counts, "forwards", trainer.target_loss))]
    memoir._ensure_prefixes()  # generated once per patched model, outside the count
    memoir.memoir_config.max_steps, memoir.memoir_config.stop_loss = steps, 0.0
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        with FlopCounterMode(display=False) as total:
            result = memoir.edit(prompt, target)
    if result.steps != steps:
        raise RuntimeError(f"the edit ran {result.steps} steps, not {steps}")
    forwards = counts.pop("forwards")  # steps + 1 of them: the last one only reads the final loss
    fixed = sum(counts.values())
    counts["step forward"] = forwards / (steps + 1)
    counts["step backward"] = (total.get_total_flops() / 1e9 - fixed - forwards) / steps
    return {phase: counts.get(phase, 0.0) for phase in PHASES}


def per_edit(phases: dict[str, float], steps: float) -> float:
    """GFLOP of an edit that takes ``steps`` steps (and one more forward that reads the final loss)."""
    fixed = phases["fingerprint"] + phases["pass below the memory"] + phases["success check"]
    return fixed + steps * (phases["step forward"] + phases["step backward"]) + phases["step forward"]


def measured_steps_per_edit() -> float | None:
    path = RESULTS / "bench_edit.json"
    return json.loads(path.read_text())["cached_paired"]["steps_per_edit"] if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ZSRE_EDITS))
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    parser.add_argument("--steps", type=int, default=5, help="steps each counted edit runs")
    args = parse_args(parser, name="flops_edit", threads=1)

    import memoir_hf
    from memoir_hf import MemoirConfig
    from memoir_hf.evaluation.datasets import load_records
    from memoir_hf.offline_models import load_builtin

    record = load_records(args.data, "zsre", limit=1)[0]
    base, tokenizer = load_builtin("smollm2")
    phases = {}
    for path in ("naive", "cached"):
        memoir = memoir_hf.patch(base, MemoirConfig.from_yaml(args.config), tokenizer=tokenizer)
        memoir.edit_path = path
        phases[path] = phases_of_one_edit(memoir, record.prompt, record.target, args.steps)
        memoir.unpatch()
    steps = measured_steps_per_edit() or 30.0
    bound = per_edit(phases["naive"], steps) / per_edit(phases["cached"], steps)
    step = {path: phases[path]["step forward"] + phases[path]["step backward"] for path in phases}
    report = {"benchmark": "flops_edit", "model": "smollm2", "record": record.prompt,
              "machine": machine(args.threads), "gflop": phases, "steps_per_edit": steps,
              "gflop_per_edit": {p: per_edit(phases[p], steps) for p in phases},
              "step_ratio": step["naive"] / step["cached"], "edit_ratio": bound}
    print(markdown_table(["phase (GFLOP)", "naive", "cached"],
                         [[phase, f"{phases['naive'][phase]:.2f}", f"{phases['cached'][phase]:.2f}"]
                          for phase in PHASES]
                         + [[f"one edit of {steps:.1f} steps", *(f"{report['gflop_per_edit'][p]:.1f}"
                                                                 for p in ("naive", "cached"))]]))
    print(f"arithmetic ratio naive/cached: {report['step_ratio']:.2f}x a step, {bound:.2f}x an edit of {steps:.1f} "
          "steps")
    print(f"wrote {write_report(args.name, report)}")


if __name__ == "__main__":
    main()

"""Soak: thousands of sequential edits on SmolLM2 with periodic save + reload checks, then many routed
generate calls; memory over time, wall time, and whether every edit still routes to itself at the end.

    python benchmarks/soak.py                                   # 5,000 edits: many hours on 2 cores
    python benchmarks/soak.py --edits 1000 --max-steps 3 --save-every 250 --generate-calls 2000 \
        --name soak_1000                                        # the shorter run of soak_1000.json

Facts come from the ZsRE edit set, then the ZsRE train subset, then CounterFact, in file order, under
``--data-dir`` (default ``$MEMOIR_DATA_DIR`` or ../shared/data). Every
``--save-every`` edits the memory is saved and attached to a second copy of the base model: its W_m,
masks and records must equal the live ones, and a sample of edit prompts must route the same way.
``--max-steps`` (default: the config's) trades edit quality for speed; routing to itself does not
depend on it. Edit deltas are not kept (``keep_edit_deltas=False``), so memory may grow only by the
masks and records. Memory is reported twice: RSS, and ``held_mb``, the RSS once glibc's
``malloc_trim`` has handed the allocator's free pages back (plain RSS creeps up with them).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

from _common import (
    DATA_DIR,
    current_rss_mb,
    machine,
    markdown_table,
    parse_args,
    peak_rss_mb,
    trimmed_rss_mb,
    write_report,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [("ZsRE/zsre_mend_edit.json", "zsre"), ("ZsRE/zsre_mend_train-1k.KnowledgeSpread-subset.json", "zsre"),
           ("counterfact/counterfact-edit.json", "counterfact")]
ROUTING_SAMPLE = 50


def load_facts(data_dir: Path, limit: int) -> list[dict]:
    from memoir_hf.evaluation.datasets import load_records

    facts: list[dict] = []
    for name, format in SOURCES:
        path = data_dir / name
        if len(facts) >= limit:
            break
        if not path.exists():
            raise SystemExit(f"{path} not found: pass --data-dir (or set MEMOIR_DATA_DIR) to the evaluation data.")
        for record in load_records(path, format, limit=limit - len(facts)):
            facts.append({"prompt": record.prompt, "target": record.target,
                          "metadata": {"source": f"{path.name}:{record.index}"}})
    return facts


def reload_matches(memoir, probe_base, folder: Path, rng: random.Random) -> dict:
    """Attach the saved memory to another copy of the base model and compare it with the live one."""
    import numpy as np
    import torch

    from memoir_hf import MemoirModel

    start = time.perf_counter()
    loaded = MemoirModel.from_pretrained(probe_base, folder, memoir.tokenizer)
    try:
        same_memory = torch.equal(loaded.layer.memory_weight, memoir.layer.memory_weight)
        same_masks = np.array_equal(loaded.store.index.codes, memoir.store.index.codes)
        same_records = [r.to_dict() for r in loaded.store.records] == [r.to_dict() for r in memoir.store.records]
        sample = rng.sample(memoir.store.records, min(ROUTING_SAMPLE, len(memoir.store.records)))
        same_routing = all(loaded.ask(r.prompt, max_new_tokens=1).routing == memoir.ask(r.prompt, max_new_tokens=1)
                           .routing for r in sample)
    finally:
        loaded.unpatch()
    return {"edits": len(memoir.store), "memory": same_memory, "masks": same_masks, "records": same_records,
            "routing": same_routing, "seconds": round(time.perf_counter() - start, 2)}


def routes_to_itself(memoir) -> dict:
    """For every stored edit: does its own prompt's mask find it (or a later edit of the same prompt)?"""
    records = memoir.store.records
    rows = [memoir.tokenizer(r.prompt)["input_ids"] for r in records]
    positions, overlaps = memoir.store.nearest(memoir._fingerprints(rows))
    newest = {r.prompt: i for i, r in enumerate(records)}
    own = [int(p) in (i, newest[r.prompt]) for i, (r, p) in enumerate(zip(records, positions, strict=True))]
    routed = overlaps >= memoir.memoir_config.threshold
    return {"edits": len(records), "nearest_is_own": sum(own),
            "routed_to_own": sum(bool(o and r) for o, r in zip(own, routed, strict=True))}


def memory_now() -> dict:
    """RSS, then what stays resident once the allocator returns its free pages (``held_mb``)."""
    rss = round(current_rss_mb(), 1)
    held = trimmed_rss_mb()
    return {"rss_mb": rss, "held_mb": None if held is None else round(held, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=5000)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--generate-calls", type=int, default=10000)
    parser.add_argument("--max-steps", type=int, default=None, help="optimisation steps per edit (default: config)")
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/checkpoints/soak"), help="checkpoint folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parse_args(parser, name="soak", threads=2)
    if min(args.edits, args.save_every, args.generate_calls) < 1:
        parser.error("--edits, --save-every and --generate-calls must be at least 1")

    import copy

    import memoir_hf
    from memoir_hf.offline_models import load_builtin

    rng = random.Random(args.seed)
    facts = load_facts(args.data_dir, args.edits)
    if len(facts) < args.edits:
        parser.error(f"the data holds {len(facts)} facts, fewer than --edits {args.edits}")
    config = dataclasses.replace(memoir_hf.MemoirConfig.from_yaml(args.config), keep_edit_deltas=False)
    if args.max_steps is not None:
        config = dataclasses.replace(config, max_steps=args.max_steps)
    base, tokenizer = load_builtin("smollm2")
    probe_base = copy.deepcopy(base)
    memoir = memoir_hf.patch(base, config, tokenizer=tokenizer)
    memoir._ensure_prefixes()
    timeline = [{"phase": "start", "edits": 0, **memory_now(), "seconds": 0.0}]
    checks, successes = [], 0
    start = time.perf_counter()
    for number, fact in enumerate(facts, start=1):
        successes += memoir.edit(fact["prompt"], fact["target"], fact["metadata"]).success
        if number % 100 == 0 or number == len(facts):
            timeline.append({"phase": "edit", "edits": number, **memory_now(),
                             "seconds": round(time.perf_counter() - start, 1)})
            print(f"{number} edits, {timeline[-1]['seconds']:.0f} s, RSS {timeline[-1]['rss_mb']:.0f} MB "
                  f"(held {timeline[-1]['held_mb']} MB)", flush=True)
        if number % args.save_every == 0 or number == len(facts):
            memoir.save_pretrained(args.out)
            checks.append(reload_matches(memoir, probe_base, Path(args.out), rng))
            print(f"  saved and reloaded: {checks[-1]}", flush=True)
    edit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    routed = 0
    for call in range(args.generate_calls):
        answer = memoir.ask(facts[rng.randrange(len(facts))]["prompt"], max_new_tokens=2)
        routed += answer.routing.routed
        if (call + 1) % 1000 == 0:
            timeline.append({"phase": "generate", "edits": len(facts), "calls": call + 1, **memory_now(),
                             "seconds": round(edit_seconds + time.perf_counter() - start, 1)})
    generate_seconds = time.perf_counter() - start
    itself = routes_to_itself(memoir)

    report = {
        "machine": machine(args.threads), "config": config.to_dict(), "edits": len(facts),
        "edit_success": successes / len(facts), "edit_seconds": round(edit_seconds, 1),
        "generate_calls": args.generate_calls, "generate_routed": routed,
        "generate_seconds": round(generate_seconds, 1), "reload_checks": checks, "routes_to_itself": itself,
        "rss_mb": {"start": timeline[0]["rss_mb"], "after_edits": next(t["rss_mb"] for t in reversed(timeline)
                                                                      if t["phase"] == "edit"),
                   "end": timeline[-1]["rss_mb"], "peak": round(peak_rss_mb(), 1)},
        "held_mb": {"start": timeline[0]["held_mb"], "end": timeline[-1]["held_mb"],
                    "max": max((t["held_mb"] for t in timeline if t["held_mb"] is not None), default=None)},
        "timeline": timeline,
    }
    print(markdown_table(["edits", "s/edit", "success", "reload checks ok", "generate calls (routed)", "s/call",
                          "own route", "RSS start/after edits/end MB", "held start/end/max MB"],
                         [[len(facts), f"{edit_seconds / len(facts):.2f}", f"{report['edit_success']:.3f}",
                           f"{sum(all(c[k] for k in ('memory', 'masks', 'records', 'routing')) for c in checks)}/"
                           f"{len(checks)}", f"{args.generate_calls} ({routed})",
                           f"{generate_seconds / max(1, args.generate_calls):.3f}",
                           f"{itself['routed_to_own']}/{itself['edits']}",
                           f"{report['rss_mb']['start']:.0f}/{report['rss_mb']['after_edits']:.0f}/"
                           f"{report['rss_mb']['end']:.0f}",
                           "/".join(f"{report['held_mb'][k]:.0f}" if report["held_mb"][k] is not None else "-"
                                    for k in ("start", "end", "max"))]]))
    print(f"wrote {write_report(args.name, report)}")


if __name__ == "__main__":
    main()

"""memoir-hf edit / ask / list / remove / correct / info: working on one checkpoint folder.

A command that changes the memory saves the folder once, at the end, atomically: if it fails or is
interrupted half way, the checkpoint on disk is exactly what it was before the command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import MemoirError
from .common import UsageError, add_model_arguments, open_memoir, print_json, shorten


def add_memory_commands(commands: argparse._SubParsersAction) -> None:
    edit = commands.add_parser("edit", help="write one fact, or every fact of a JSONL/CSV file, into a checkpoint",
                               description="Edit facts into the checkpoint folder (created if it holds none yet).")
    add_model_arguments(edit)
    _add_fact_arguments(edit, answer="--target")
    edit.add_argument("--metadata", default=None, help="JSON object stored with a single --prompt edit")
    edit.add_argument("--config", default=None, help="YAML (or JSON) MemoirConfig for a new checkpoint")
    edit.set_defaults(handler=run_edit)

    ask = commands.add_parser("ask", help="generate from a prompt through the memory",
                              description="Greedy answer to a prompt, and which edit (if any) it read.")
    add_model_arguments(ask)
    ask.add_argument("--prompt", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.set_defaults(handler=run_ask)

    listing = commands.add_parser("list", help="list (and search) the edits of a checkpoint",
                                  description="The stored edits, oldest first; needs no model.")
    listing.add_argument("checkpoint")
    listing.add_argument("--search", default=None, help="only edits whose prompt or target contain this text")
    outcome = listing.add_mutually_exclusive_group()
    outcome.add_argument("--failed", action="store_true", help="only edits that did not reach their target")
    outcome.add_argument("--succeeded", action="store_true", help="only edits that reached their target")
    listing.add_argument("--removed", action="store_true", help="list removed edits instead")
    listing.add_argument("--json", action="store_true", help="print JSON records")
    listing.set_defaults(handler=run_list)

    remove = commands.add_parser("remove", help="withdraw edits by id",
                                 description="Withdraw edits: their masks leave the index and what they added to "
                                             "W_m is subtracted.")
    add_model_arguments(remove)
    remove.add_argument("edit_ids", type=int, nargs="+", metavar="EDIT_ID")
    remove.add_argument("--routing-only", action="store_true",
                        help="only withdraw from routing (for edits saved without their W_m delta)")
    remove.set_defaults(handler=run_remove)

    correct = commands.add_parser("correct", help="edit only the facts the model gets wrong",
                                  description="Ask the model each fact first; edit only where its answer differs.")
    add_model_arguments(correct)
    _add_fact_arguments(correct, answer="--answer")
    correct.set_defaults(handler=run_correct)

    info = commands.add_parser("info", help="what a checkpoint holds", description="Summarise a checkpoint; "
                                                                                      "needs no model.")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=run_info)


def _add_fact_arguments(parser: argparse.ArgumentParser, *, answer: str) -> None:
    parser.add_argument("--prompt", default=None, help="the prompt of one fact")
    parser.add_argument(answer, dest="answer", default=None, help="what the model should answer after it")
    parser.add_argument("--file", default=None,
                        help="a .jsonl or .csv file of facts (fields prompt and target or answer; others are metadata)")


def _facts(args: argparse.Namespace, answer_flag: str) -> list[dict[str, Any]]:
    from ..editing.fact_files import read_facts

    single = args.prompt is not None or args.answer is not None
    if single == (args.file is not None):
        raise UsageError(f"give either --prompt and {answer_flag}, or --file")
    if args.file is not None:
        return read_facts(args.file)
    if args.prompt is None or args.answer is None:
        raise UsageError(f"--prompt and {answer_flag} go together")
    return [{"prompt": args.prompt, "target": args.answer, "metadata": _metadata(args)}]


def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "metadata", None) is None:
        return {}
    try:
        value = json.loads(args.metadata)
    except json.JSONDecodeError as error:
        raise UsageError(f"--metadata is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError("--metadata must be a JSON object")
    return value


def run_edit(args: argparse.Namespace) -> int:
    if args.metadata is not None and args.file is not None:
        raise UsageError("--metadata goes with --prompt; in a file, put metadata in each row")
    facts = _facts(args, "--target")
    memoir = open_memoir(args, create=True, config_path=args.config)
    results = memoir.edit_many(facts, progress=len(facts) > 1)
    for fact, result in zip(facts, results, strict=True):
        if result.error is not None:
            print(f"NOT STORED: {shorten(fact['prompt'])!r}: {result.error}")
            continue
        outcome = "ok" if result.success else "FAILED"
        print(f"edit {result.edit_id} {outcome}: {shorten(fact['prompt'])!r} -> {shorten(fact['target'], 30)!r} "
              f"({result.steps} steps, loss {result.loss:.3f}, {result.seconds:.1f} s)")
    memoir.save_pretrained(args.checkpoint)
    written = [r for r in results if r.error is None]
    failed = sum(not r.success for r in written)
    not_stored = len(results) - len(written)
    print(f"{len(written)} edits written ({failed} did not reach their target"
          f"{f'; {not_stored} NOT STORED' if not_stored else ''}); {len(memoir.store)} stored in {args.checkpoint}")
    return 1 if not_stored else 0


def run_ask(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    memoir = open_memoir(args)
    answer = memoir.ask(args.prompt, max_new_tokens=args.max_new_tokens)
    print(answer.text)
    routing = answer.routing
    tau = memoir.memoir_config.threshold
    if routing.routed:
        edit = memoir.get_edit(routing.edit_id)
        print(f"[read edit {edit.edit_id}, overlap {routing.overlap:.3f} >= τ {tau:.3f}: "
              f"{shorten(edit.prompt)!r} -> {shorten(edit.target, 30)!r}]")
    elif routing.overlap is None:
        print("[no edit read: the memory is empty]")
    else:
        print(f"[no edit read: best overlap {routing.overlap:.3f} (edit {routing.nearest_edit_id}) < τ {tau:.3f}]")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..management.search import matching_edits
    from ..persistence.checkpoint import read_checkpoint

    checkpoint = _read(args.checkpoint, read_checkpoint)
    pool = checkpoint.removed if args.removed else checkpoint.records
    success = True if args.succeeded else False if args.failed else None
    records = matching_edits(pool, args.search, success=success)
    if args.json:
        print_json([record.to_dict() for record in records])
        return 0
    for record in records:
        mark = "ok" if record.success else "--"
        removable = "" if args.removed or record.edit_id in checkpoint.deltas else " (routing-only)"
        extra = f" {json.dumps(record.metadata, ensure_ascii=False)}" if record.metadata else ""
        print(f"{record.edit_id:>6} {mark} {shorten(record.prompt)!r} -> {shorten(record.target, 30)!r}"
              f"{removable}{extra}")
    print(f"{len(records)} of {len(pool)} {'removed ' if args.removed else ''}edits")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    if len(set(args.edit_ids)) != len(args.edit_ids):
        raise UsageError("an edit id is given twice")
    memoir = open_memoir(args)
    for edit_id in args.edit_ids:  # all checked before any is removed
        memoir.get_edit(edit_id)
        if not args.routing_only and edit_id not in memoir.store.deltas:
            raise MemoirError(f"edit {edit_id} was saved without its W_m delta; pass --routing-only to withdraw "
                              "it from routing only")
    for edit_id in args.edit_ids:
        record = memoir.remove_edit(edit_id, routing_only=args.routing_only)
        print(f"removed edit {edit_id}: {shorten(record.prompt)!r} -> {shorten(record.target, 30)!r}")
    memoir.save_pretrained(args.checkpoint)
    print(f"{len(memoir.store)} edits remain in {args.checkpoint}")
    return 0


def run_correct(args: argparse.Namespace) -> int:
    facts = _facts(args, "--answer")
    memoir = open_memoir(args)
    report = memoir.correct_many(facts, progress=len(facts) > 1)
    for correction in report.corrections:
        print(f"{correction.status}: {shorten(correction.prompt)!r}: {correction.reason}")
    if report.edited or report.failed:
        memoir.save_pretrained(args.checkpoint)
    print(report.summary())
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..persistence.checkpoint import read_checkpoint

    checkpoint = _read(args.checkpoint, read_checkpoint)
    manifest, target = checkpoint.manifest, checkpoint.manifest["target"]
    summary = {
        "folder": str(checkpoint.folder),
        "library_version": manifest.get("library_version"),
        "format_version": manifest["format_version"],
        "base_model": manifest.get("base_model") or checkpoint.fingerprint.get("name_or_path"),
        "model_type": target.get("model_type"),
        "module": target["module_name"],
        "d_model": target["d_model"], "d_ff": target["d_ff"], "top_k": target["top_k"],
        "edits": len(checkpoint.records),
        "succeeded": sum(r.success for r in checkpoint.records),
        "removable": len(checkpoint.deltas),
        "removed": len(checkpoint.removed),
        "threshold": checkpoint.config.threshold,
        "base_model_saved": (checkpoint.folder / "config.json").is_file(),
        "files": {p.name: p.stat().st_size for p in sorted(checkpoint.folder.iterdir()) if p.is_file()},
    }
    if args.json:
        print_json(summary)
        return 0
    for key, value in summary.items():
        if key == "files":
            value = ", ".join(f"{name} ({size:,} B)" for name, size in value.items())
        print(f"{key:>17}: {value}")
    return 0


def _read(folder: str, read_checkpoint: Any) -> Any:
    from ..persistence.atomic import recover_interrupted_swap

    recover_interrupted_swap(folder)
    return read_checkpoint(Path(folder))

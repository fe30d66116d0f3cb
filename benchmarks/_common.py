"""What every benchmark script shares: quiet threads, a description of the machine, a table, a JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA_DIR = Path(os.environ.get("MEMOIR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
"""The evaluation data: $MEMOIR_DATA_DIR, else ../shared/data beside the repository (as the tests read it)."""
ZSRE_EDITS = DATA_DIR / "ZsRE" / "zsre_mend_edit.json"


def quiet_threads(threads: int) -> None:
    """Passive OpenMP waiting and an explicit thread count: spinning threads distort shared-machine timings.

    Call before torch or faiss create their thread pools.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def parse_args(parser: argparse.ArgumentParser, *, name: str, threads: int) -> argparse.Namespace:
    """Add the options every benchmark has (--threads, --name), parse, and set the threads."""
    parser.add_argument("--threads", type=int, default=threads, help=f"torch and faiss threads (default {threads})")
    parser.add_argument("--name", default=name, help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    quiet_threads(args.threads)
    return args


def machine(threads: int) -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(name: str, report: dict) -> Path:
    from memoir_hf.persistence.atomic import atomic_file  # imports torch: not before quiet_threads

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
    return path


def merge_run(name: str, key: str, result: dict) -> Path:
    """Add (or replace) one entry of the ``runs`` of benchmarks/results/NAME.json, keeping the others."""
    path = RESULTS / f"{name}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    return write_report(name, {"runs": {**runs, key: result}})


def current_rss_mb() -> float:
    """Resident memory of this process now, in MB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def trimmed_rss_mb() -> float | None:
    """Resident memory after glibc hands its free heap pages back to the OS (None without glibc).

    Plain RSS also counts memory the allocator keeps after it was freed, which creeps up as tensors of
    ever different shapes come and go; this figure is what the process really holds.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return None
    trim(0)
    return current_rss_mb()

"""Shared fixtures: tiny models from config, the real SmolLM2 model, the evaluation data."""

from __future__ import annotations

import os

# Before torch loads: spinning OpenMP threads slow a shared 2-core machine down several times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests never download: a model or tokenizer that is not on disk must fail at once, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import threading
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import make_byte_tokenizer

from memoir_hf import MemoirConfig

torch.set_num_threads(int(os.environ.get("MEMOIR_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]


def fast_config(**overrides) -> MemoirConfig:
    """Paper settings, with a high threshold for random tiny models and two short prefixes."""
    settings = {"threshold": 0.9, "prefix_starts": ("I", "You"), "prefix_lengths": (3,)}
    return MemoirConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


def data_dir() -> Path:
    return Path(os.environ.get("MEMOIR_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def zsre_records() -> list[dict]:
    path = data_dir() / "ZsRE" / "zsre_mend_edit.json"
    if not path.exists():
        pytest.skip(f"ZsRE data not found at {path}; set MEMOIR_DATA_DIR to the shared data folder")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, loaded once. Tests must leave it unpatched."""
    from memoir_hf.offline_models import load_builtin

    return load_builtin("smollm2")


def written_before_file_checksums(folder: Path) -> None:
    """Drop the files' checksums from a checkpoint's manifest, as releases before them wrote it: a test that
    damages a file on purpose then reaches the check it is about."""
    path = folder / "memoir_config.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.pop("files_sha256", None)
    path.write_text(json.dumps(manifest), encoding="utf-8")


def run_threads(targets, timeout: float = 120) -> list[BaseException]:
    """Run each callable in its own thread; the exceptions they raised (a hung thread fails the test)."""
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - collected and asserted on
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors

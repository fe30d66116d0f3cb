"""Thread safety: model calls run at once, each routed on its own; changes to the memory are exclusive,
so every call sees the memory before an edit or after it, and results equal a serial run's."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import fast_config, run_threads
from tiny_models import make_byte_tokenizer, make_tiny_model

import memoir_hf
from memoir_hf import MemoirError
from memoir_hf.concurrency import SharedExclusiveLock

FACTS = [("The cat sat on the", "mat"), ("Bob likes to eat", "figs"), ("Alice plays the", "drums")]
PROMPTS = [fact[0] for fact in FACTS] + ["Quantum fields fluctuate", "The weather today is"]


def make_memoir():
    return memoir_hf.patch(make_tiny_model("llama"), fast_config(), tokenizer=make_byte_tokenizer())


def greedy(memoir, prompt: str) -> tuple[tuple[int, ...], int | None]:
    ids = torch.tensor([memoir.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = memoir.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
    return tuple(out[0, ids.shape[1]:].tolist()), memoir.routing[0].edit_id


@pytest.fixture(scope="module")
def serial_states():
    """Outputs of every prompt after 0, 1, ..., len(FACTS) edits, and the final W_m, from a serial run."""
    memoir = make_memoir()
    states = [{prompt: greedy(memoir, prompt) for prompt in PROMPTS}]
    for fact in FACTS:
        memoir.edit(*fact)
        states.append({prompt: greedy(memoir, prompt) for prompt in PROMPTS})
    return states, memoir.layer.memory_weight.detach().clone()


def test_generate_in_threads_while_another_thread_edits_matches_a_serial_run(serial_states):
    states, final_memory = serial_states
    memoir = make_memoir()
    seen: list[tuple[str, tuple]] = []
    editing_done = threading.Event()

    def edit_all():
        for fact in FACTS:
            memoir.edit(*fact)
            time.sleep(0.01)
        editing_done.set()

    def generate_until_done(offset: int):
        turn = offset
        while not editing_done.is_set() or turn < offset + len(PROMPTS):
            prompt = PROMPTS[turn % len(PROMPTS)]
            seen.append((prompt, greedy(memoir, prompt)))
            turn += 1

    errors = run_threads([edit_all] + [lambda i=i: generate_until_done(i) for i in range(3)])
    assert errors == []
    assert len(seen) >= 3 * len(PROMPTS)
    for prompt, output in seen:  # each call saw one whole state of the memory
        assert output in [state[prompt] for state in states], prompt
    assert torch.equal(memoir.layer.memory_weight, final_memory)
    assert [e.prompt for e in memoir.edits] == [fact[0] for fact in FACTS]
    for prompt in PROMPTS:  # and afterwards everything reads the final state
        assert greedy(memoir, prompt) == states[-1][prompt]


def test_each_thread_reads_its_own_routing(serial_states):
    states, _ = serial_states
    memoir = make_memoir()
    for fact in FACTS:
        memoir.edit(*fact)
    mismatches = []

    def ask_repeatedly(prompt: str):
        for _ in range(15):
            output = greedy(memoir, prompt)
            if output != states[-1][prompt] or memoir.routing[0].edit_id != states[-1][prompt][1]:
                mismatches.append((prompt, output, memoir.routing))

    assert run_threads([lambda p=p: ask_repeatedly(p) for p in PROMPTS]) == []
    assert mismatches == []


def test_disable_memory_in_one_thread_leaves_the_others_alone(serial_states):
    states, _ = serial_states
    memoir = make_memoir()
    for fact in FACTS:
        memoir.edit(*fact)
    inside = threading.Event()
    release = threading.Event()
    results = {}

    def disabled_thread():
        with memoir.disable_memory():
            inside.set()
            release.wait(30)
            results["disabled"] = greedy(memoir, FACTS[0][0])

    def reading_thread():
        inside.wait(30)
        results["reading"] = greedy(memoir, FACTS[0][0])
        release.set()

    assert run_threads([disabled_thread, reading_thread]) == []
    assert results["reading"] == states[-1][FACTS[0][0]] and results["reading"][1] == 0
    assert results["disabled"] == (states[0][FACTS[0][0]][0], None)


@pytest.mark.parametrize("caller", ["generate", "edit", "calibrate_threshold"])  # the library's own passes too
def test_changing_the_memory_from_inside_a_forward_is_refused(caller):
    memoir = make_memoir()
    memoir.edit(*FACTS[0])
    refused = []

    def hook(module, args, output):
        try:
            memoir.remove_edit(0)
        except MemoirError as error:
            refused.append(str(error))

    handle = memoir.base_model.model.layers[0].register_forward_hook(hook)
    try:
        if caller == "generate":
            greedy(memoir, "Quantum fields fluctuate")
        elif caller == "edit":
            memoir.edit(*FACTS[1])
        else:
            memoir.calibrate_threshold(["Quantum fields fluctuate"])
    finally:
        handle.remove()
    assert refused and all("inside a forward or generate call" in message for message in refused)
    assert [e.edit_id for e in memoir.edits][0] == 0


# -- the lock itself -------------------------------------------------------------------------------

def test_a_shared_section_inside_an_exclusive_one_cannot_take_it_exclusively_again():
    """A forward the library makes while it holds the memory: a hook in it must not change the memory."""
    lock = SharedExclusiveLock()
    with lock.exclusive():
        with lock.exclusive():  # re-entrant as such
            pass
        with lock.shared(), pytest.raises(MemoirError, match="inside a forward"), lock.exclusive():
            pass

def test_shared_holders_run_together():
    lock = SharedExclusiveLock()
    barrier = threading.Barrier(3, timeout=10)

    def reader():
        with lock.shared():
            barrier.wait()  # all three inside at once, or the barrier times out

    assert run_threads([reader] * 3) == []


def test_exclusive_waits_for_shared_and_blocks_new_shared():
    lock = SharedExclusiveLock()
    events: list[str] = []
    reader_in = threading.Event()
    writer_waiting = threading.Event()

    def first_reader():
        with lock.shared():
            reader_in.set()
            writer_waiting.wait(10)
            time.sleep(0.1)
            events.append("reader 1 out")

    def writer():
        reader_in.wait(10)
        writer_waiting.set()
        with lock.exclusive():
            events.append("writer")

    def late_reader():
        writer_waiting.wait(10)
        time.sleep(0.05)  # arrives while the writer waits: the writer goes first
        with lock.shared():
            events.append("reader 2")

    assert run_threads([first_reader, writer, late_reader]) == []
    assert events == ["reader 1 out", "writer", "reader 2"]


def test_lock_is_reentrant_and_refuses_upgrades():
    lock = SharedExclusiveLock()
    with lock.exclusive(), lock.exclusive(), lock.shared():
        pass
    with lock.shared(), lock.shared(), pytest.raises(MemoirError), lock.exclusive():
        pass
    with lock.exclusive():  # nothing was left held
        pass


def test_overlapping_calls_keep_dropout_off_until_the_last_one_ends():
    """Two threads' calls end out of order: the model must stay in eval until the last, then train again."""
    memoir = make_memoir()
    memoir.base_model.train()
    first, second = memoir._inference_mode(), memoir._inference_mode()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not memoir.base_model.training
    second.__exit__(None, None, None)
    assert memoir.base_model.training

"""MemoirModel: a transformers causal LM with a MEMOIR memory beside one MLP down projection."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ._version import __version__
from .concurrency import SharedEvalMode, SharedExclusiveLock, exclusive, shared
from .config import MemoirConfig, check_spread_texts
from .editing.fact_files import fact_records
from .editing.inputs import (
    EncodedFact,
    Fact,
    check_fact,
    check_text,
    context_length,
    encode_fact,
    fact_from_record,
    record_position,
    valid_unicode,
)
from .editing.prefix_cache import reuse_frozen_prefix
from .editing.prefixes import generate_prefixes, with_prefix
from .editing.result import EditResult
from .editing.trainer import EditBatch, TrainOutcome, target_logits, train_columns
from .errors import EditInputError, MemoirError, PatchError
from .feedback.correction import Accept, Correction, CorrectionReport, check_accept, correct_many, correct_one
from .feedback.learning import LearnReport, learn_from
from .feedback.log import FeedbackLog, check_confidence
from .fingerprint.activations import down_proj_inputs_in_batches
from .fingerprint.background import compute_background, default_background_prompts, pad_token_id
from .fingerprint.tophash import BACKGROUND_AGGREGATIONS, TopHash
from .generation import Answer, check_generate_options, greedy_new_tokens
from .management.consolidation import ConsolidationReport, consolidate
from .management.search import matching_edits
from .memory.earlier_keys import EarlierKeys
from .memory.layer import MemoirLayer
from .memory.store import EditDelta, EditRecord, EditStore, utc_now
from .patching.dispatch import loaded_weight
from .patching.target import PatchTarget, check_config, find_target
from .persistence.atomic import atomic_folder, recover_interrupted_swap
from .persistence.base_model import BASE_MODEL_FILES, save_base_model
from .persistence.checkpoint import (
    MEMOIR_FILES,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    restore_store,
    write_checkpoint,
)
from .persistence.fingerprint import base_fingerprint, check_fingerprint, check_model_type
from .routing.calibration import Calibration, choose_threshold
from .routing.router import Router, RoutingDecision

EDIT_PATHS = ("cached", "naive")


class MemoirModel(nn.Module):
    """Wraps a loaded causal LM: ``edit()`` writes facts, ``forward``/``generate`` read them.

    Every attribute MemoirModel does not define is forwarded to the base model, so it can stand in
    for a transformers model. Create one with :func:`memoir_hf.patch`.
    """

    def __init__(self, model: nn.Module, config: MemoirConfig | None = None, tokenizer: Any = None, *,
                 use_faiss: bool | None = None, checkpoint: Checkpoint | None = None):
        super().__init__()
        _refuse_double_patch(model)
        _check_config_and_tokenizer(config, tokenizer)
        config = dataclasses.replace(config) if config is not None else MemoirConfig()
        target = find_target(model, config)
        if tokenizer is None and checkpoint is None:
            raise MemoirError("patch needs the model's tokenizer: memoir_hf.patch(model, config, tokenizer=tok).")
        if checkpoint is not None:
            check_fingerprint(checkpoint.fingerprint, _fingerprint_of(model, target))
        down_proj = model.get_submodule(target.module_name)
        layer = MemoirLayer(down_proj, target.d_model, target.d_ff)
        layer.tophash = TopHash(target.d_ff, target.top_k, config.aggregation, config.seed, device=layer.device)
        store = EditStore(target.d_ff, target.top_k, use_faiss=use_faiss)

        config.lock_structure()
        self._memory_lock = SharedExclusiveLock()
        self._eval_mode = SharedEvalMode()
        self.base_model = model
        self._memoir_config = config
        self.target = target
        self.tokenizer = tokenizer
        self.store = store
        self.router = Router(model, layer.tophash, store, config)
        self.prefixes: list[str] | None = None
        self._prefixes_from: tuple[tuple[str, ...], tuple[int, ...]] | None = None
        """The (prefix_starts, prefix_lengths) the prefixes were generated from."""
        self.earlier_keys: EarlierKeys | None = None
        """Second moment of the tokens of the edits written with ``protect_earlier_edits`` > 0."""
        self.base_model_source: str | None = None
        """How to load the base model again (a built-in name, folder or Hub id), saved in the checkpoint
        so that ``memoir-hf`` commands need no ``--model``; set by whoever loaded the model."""
        self._edit_path = "cached"
        object.__setattr__(self, "_layer", layer)  # already a submodule of base_model
        self._patched = True
        layer.router = self.router
        setattr(model.get_submodule(target.parent_name), target.attribute, layer)
        self._hook = model.register_forward_pre_hook(self.router.before_model_call, with_kwargs=True)
        try:
            if checkpoint is not None:
                self._restore(checkpoint)
            elif config.aggregation in BACKGROUND_AGGREGATIONS:
                self.compute_background(config.background_prompts or default_background_prompts())
        except BaseException:
            self.unpatch()
            raise

    # -- forwarding, like peft's PeftModel ------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None or name.startswith("__"):
                if self.__dict__.get("_patched") is False and not name.startswith("__"):
                    raise PatchError(f"this MemoirModel was unpatched, so it no longer has {name!r}: use the "
                                     "model unpatch() returned.") from None
                raise
            return getattr(base, name)

    @shared
    def forward(self, *args: Any, prompt_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward, reading the memory. ``prompt_mask`` ([batch, seq], 1 on prompt
        tokens) limits the fingerprint to the prompt when the input also holds an answer, as in
        teacher forcing; by default every attended token counts."""
        self._check_patched()
        if prompt_mask is not None:
            _check_prompt_mask(prompt_mask)
        with self.router.prompt_mask(prompt_mask):
            return self.base_model(*args, **kwargs)

    @shared
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's generate; routing is decided from the prompt and kept for every new token."""
        self._check_patched()
        check_generate_options(kwargs, getattr(self.base_model, "generation_config", None))
        with self.router.generation(kwargs.get("attention_mask")):
            return self.base_model.generate(*args, **kwargs)

    # -- state ------------------------------------------------------------------------------
    @property
    def memoir_config(self) -> MemoirConfig:
        """This memory's settings: a copy of the config passed at patch time. Threshold and optimiser
        settings may be changed on it; structural ones are fixed."""
        return self._memoir_config

    @property
    def edit_path(self) -> str:
        """How an edit's optimisation steps run.

        "cached" (default) runs the frozen network below the memory once per edit and each step only
        through the memory and the layers above it, with logits at the target positions only. "naive"
        runs the whole network, with logits at every position, at every step, as the reference code
        does: a reference for benchmarks and debugging. Both write the same W_m.
        """
        return self._edit_path

    @edit_path.setter
    def edit_path(self, value: str) -> None:
        if value not in EDIT_PATHS:
            raise MemoirError(f"edit_path must be one of {EDIT_PATHS}, got {value!r}.")
        self._edit_path = value

    @property
    def layer(self) -> MemoirLayer:
        return self._layer

    @property
    def routing(self) -> list[RoutingDecision]:
        """Per sequence of the last prompt pass: the edit it read (or None) and its overlap."""
        return list(self.router.decisions)

    @property
    def edits(self) -> list[EditRecord]:
        """Copies of the stored edit records, oldest first."""
        return copy.deepcopy(self.store.records)

    @contextmanager
    def disable_memory(self) -> Iterator[None]:
        """Within this block the model is exactly the base model: no sequence reads the memory."""
        self._check_patched()
        with self.router.disabled():
            yield

    @exclusive
    def compute_background(self, texts: Sequence[str]) -> None:
        """Recompute the background and spread from these texts (only while the memory has no edit)."""
        self._check_patched()
        if len(self.store):
            raise MemoirError("the background can only be recomputed before the first edit: the stored masks "
                              "were computed with the current one.")
        texts = _text_list(texts, "compute_background needs a non-empty list of non-empty strings")
        check_spread_texts(self.memoir_config.aggregation, texts)
        tokenizer = self._require_tokenizer()
        self._check_fit([tokenizer(t)["input_ids"] for t in texts], "background texts")
        with self._inference_mode():
            compute_background(self.base_model, tokenizer, self._layer, self._layer.tophash, texts)

    # -- editing ----------------------------------------------------------------------------
    def edit(self, prompt: str, target: str, metadata: dict[str, Any] | None = None) -> EditResult:
        """Write one fact: after ``prompt`` (and its paraphrases) the model answers ``target``."""
        self._check_patched()
        fact = check_fact(prompt, target, metadata)
        return self._write(fact, self._encode(fact))

    def edit_many(self, records: Iterable[Any] | str | os.PathLike, *, progress: bool = True) -> list[EditResult]:
        """Write facts one after another: dicts with prompt, target (and metadata), (prompt, target)
        pairs, or a JSONL/CSV file of them (see :func:`memoir_hf.read_facts`). Every record is
        checked before the first is written."""
        self._check_patched()
        facts = [fact_from_record(record, i) for i, record in enumerate(fact_records(records, "edit_many"))]
        encoded = [self._encode(fact, where=record_position(i)) for i, fact in enumerate(facts)]
        results = []
        bar = tqdm(zip(facts, encoded, strict=True), total=len(facts), desc="memoir edits", unit="edit",
                   disable=not progress)
        for fact, fact_ids in bar:
            results.append(self._write(fact, fact_ids))
            bar.set_postfix(success=f"{sum(r.success for r in results) / len(results):.2f}")
        return results

    @exclusive
    def learn_from(self, feedback_log: FeedbackLog | str | os.PathLike, *, min_confidence: float = 0.8,
                   progress: bool = True) -> LearnReport:
        """Apply the log's corrections with confidence >= ``min_confidence`` that no stored edit came from.

        Each edit records its ``feedback_id`` in its metadata (saved with the checkpoint), so running
        this again, in this process or after save and load, edits nothing new; it holds the memory
        for the whole run, so two threads learning from one log edit each correction once (other
        threads' forward and generate calls wait meanwhile).
        ``feedback_log`` is a :class:`FeedbackLog` or the path of its file.
        """
        self._check_patched()
        if isinstance(feedback_log, (str, os.PathLike)):
            if not os.path.isfile(feedback_log):
                raise MemoirError(f"no feedback log at {feedback_log}; pass the path of an existing log file.")
            feedback_log = FeedbackLog(feedback_log)
        if not isinstance(feedback_log, FeedbackLog):
            raise MemoirError("learn_from needs a FeedbackLog or the path of its file, "
                              f"got {type(feedback_log).__name__}.")
        check_confidence(min_confidence, "min_confidence")
        return learn_from(self, feedback_log, min_confidence=min_confidence, progress=progress)

    def correct(self, prompt: str, answer: str, *, accept: Accept | None = None,
                metadata: dict[str, Any] | None = None) -> Correction:
        """Ask the model (greedy, through the memory) and edit only if its answer is not ``answer``.

        By default the answer counts as given when the model's continuation, normalised (case,
        punctuation, articles, spaces), is ``answer`` or starts with it followed by more words;
        ``accept(model_answer, answer) -> bool`` replaces that test.
        """
        self._check_patched()
        check_accept(accept)
        fact = check_fact(prompt, answer, metadata)
        return correct_one(self, fact, self._encode(fact), accept)

    def correct_many(self, items: Iterable[Any] | str | os.PathLike, *, accept: Accept | None = None,
                     progress: bool = True) -> CorrectionReport:
        """``correct`` over a list of {prompt, answer} dicts or (prompt, answer) pairs, or a JSONL/CSV file.

        Every item is checked before the first edit; the report counts checked, already correct,
        edited and failed facts and keeps each Correction.
        """
        self._check_patched()
        check_accept(accept)
        return correct_many(self, items, accept, progress=progress)

    def ask(self, prompt: str, *, max_new_tokens: int = 32) -> Answer:
        """The model's greedy continuation of ``prompt`` through the memory, and the edit it read."""
        self._check_patched()
        check_text(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MemoirError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
        prompt_ids = self._require_tokenizer()(prompt)["input_ids"]
        limit = self._context_length
        if limit is not None and len(prompt_ids) >= limit:
            raise EditInputError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {limit}.")
        text = self._greedy_answer(prompt_ids, max_new_tokens)
        return Answer(prompt, text, self.router.decisions[0])

    # -- managing stored edits ------------------------------------------------------------------
    def get_edit(self, edit_id: int) -> EditRecord:
        """A copy of one stored edit's record; MemoirError if no stored edit has this id."""
        return copy.deepcopy(self.store.records[self.store.position_of(edit_id)])

    def find_edits(self, text: str | None = None, *, metadata: Mapping[str, Any] | None = None,
                   success: bool | None = None) -> list[EditRecord]:
        """Copies of the stored edits whose prompt or target contains ``text`` (case-insensitive),
        whose metadata holds every item of ``metadata``, and whose success is ``success``."""
        return copy.deepcopy(matching_edits(self.store.records, text, metadata=metadata, success=success))

    @property
    def removed_edits(self) -> list[EditRecord]:
        """Copies of the records of removed (and merged) edits, kept so their feedback is not applied again."""
        return copy.deepcopy(self.store.removed)

    @exclusive
    def remove_edit(self, edit_id: int, *, routing_only: bool = False) -> EditRecord:
        """Withdraw one edit and return its record.

        Its mask leaves the index, so no prompt routes to it any more, and what it added to W_m is
        subtracted. W_m then holds what the remaining edits added, to float32 rounding (the deltas of
        the stored edits sum to W_m while every edit kept its delta). What is not restored: edits
        written after this one were trained on top of its values on the columns they share, so on
        those columns they now see different weights; check them (``memoir.edits`` and a forward
        pass) if many share its columns. Edits written with ``keep_edit_deltas=False`` (or loaded
        from a checkpoint saved without deltas) can only be withdrawn from routing: pass
        ``routing_only=True``.
        """
        self._check_patched()
        if not isinstance(routing_only, bool):
            raise MemoirError(f"routing_only must be True or False, got {routing_only!r}.")
        self.store.position_of(edit_id)
        if not routing_only and edit_id not in self.store.deltas:
            raise MemoirError(f"edit {edit_id}'s part of W_m is unknown (it was written without keep_edit_deltas, "
                              "merged with an edit that was, or loaded from a checkpoint saved without deltas); "
                              "remove_edit(edit_id, routing_only=True) withdraws it from routing only.")
        (removed,) = self.store.remove([edit_id])
        if removed.delta is not None and not routing_only:
            self._layer.subtract_columns(removed.delta.columns, removed.delta.values)
        return copy.deepcopy(removed.record)

    @exclusive
    def consolidate(self, min_overlap: float = 0.9, *, merge_duplicates: bool = True,
                    resolve_conflicts: bool = False) -> ConsolidationReport:
        """Find edits whose masks overlap at >= ``min_overlap`` (the same fact edited more than once).

        A group whose targets agree (after normalisation) is a duplicate: the older edits are merged
        into the newest (withdrawn from routing, their W_m deltas folded into its delta; W_m does
        not change). A group with different targets is a conflict: reported, and merged the same
        way (the newest target wins) only with ``resolve_conflicts``. Routing already prefers the
        newest edit on a tie, so a later edit of the same prompt wins without consolidating.
        Costs O(n^2 d_ff) over n stored edits.
        """
        self._check_patched()
        return consolidate(self.store, min_overlap, merge_duplicates=merge_duplicates,
                           resolve_conflicts=resolve_conflicts)

    @property
    def _context_length(self) -> int | None:
        return context_length(self.base_model.config)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise MemoirError("editing needs the model's tokenizer: set memoir.tokenizer = tok, or pass tokenizer= "
                              "to MemoirModel.from_pretrained / memoir_hf.load.")
        return self.tokenizer

    def _encode(self, fact: Fact, *, where: str = "") -> EncodedFact:
        return encode_fact(self._require_tokenizer(), fact, self._context_length, where=where)

    def _greedy_answer(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation through the memory (routing decided from the prompt), decoded."""
        limit = self._context_length
        if limit is not None:
            max_new_tokens = max(1, min(max_new_tokens, limit - len(prompt_ids)))
        tokenizer = self._require_tokenizer()
        with self._inference_mode():
            new_tokens = greedy_new_tokens(self, tokenizer, prompt_ids, max_new_tokens, self._layer.device)
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    @exclusive
    def _write(self, fact: Fact, encoded: EncodedFact) -> EditResult:
        start = time.perf_counter()
        with self._inference_mode():
            mask = self._fingerprint(encoded.prompt_ids)
            columns = mask.nonzero().squeeze(1)
            batch = self._edit_batch(fact.prompt, encoded, self._context_length)
            earlier = self._earlier_keys().restricted_to(columns) if self._protects_earlier_edits else None
            with self._frozen_prefix(batch):
                outcome = train_columns(self.base_model, self._layer, batch, columns, self.memoir_config,
                                        all_positions=self.edit_path == "naive", earlier_keys=earlier)
        if not _finite_in(outcome.columns_value, self._layer.memory_weight.dtype):
            return EditResult(None, False, outcome.loss, outcome.steps, time.perf_counter() - start, 0.0, None,
                              error=f"the optimisation produced values that are not finite in "
                                    f"{self._layer.memory_weight.dtype} (NaN or inf); nothing was written. Lower "
                                    "learning_rate or max_grad_norm, or edit in float32.")
        record = self._commit(fact, mask, columns, outcome, batch.attention_mask)
        accuracy, routed = self._check_edit(encoded)
        record.success = accuracy == 1.0
        return EditResult(record.edit_id, record.success, outcome.loss, outcome.steps,
                          time.perf_counter() - start, accuracy, routed)

    def _commit(self, fact: Fact, mask: torch.Tensor, columns: torch.Tensor, outcome: TrainOutcome,
                attention_mask: torch.Tensor) -> EditRecord:
        """Write the trained columns into W_m and store the edit (and its keys, when they are kept), all or nothing."""
        keys_added: AbstractContextManager[None] = nullcontext()
        if self._protects_earlier_edits:
            moment = EarlierKeys.moment(outcome.inputs, attention_mask, columns)
            keys_added = self._earlier_keys().added(columns, moment)
        before = self._layer.memory_weight[:, columns].detach().clone()
        record = EditRecord(self.store.next_id, fact.prompt, fact.target, fact.metadata, utc_now(),
                            loss=outcome.loss)
        with keys_added:
            try:
                self._layer.write_columns(columns, outcome.columns_value)
                delta = None
                if self.memoir_config.keep_edit_deltas:
                    written = self._layer.memory_weight[:, columns].detach()
                    delta = EditDelta(columns.cpu(), (written.float() - before.float()).cpu())
                self.store.add(record, mask, delta)
            except BaseException:
                self._layer.write_columns(columns, before)
                raise
        return record

    @property
    def _protects_earlier_edits(self) -> bool:
        return self.memoir_config.protect_earlier_edits > 0

    def _earlier_keys(self) -> EarlierKeys:
        if self.earlier_keys is None:
            self.earlier_keys = EarlierKeys(self.target.d_ff, device=self._layer.device)
        return self.earlier_keys

    def _fingerprint(self, prompt_ids: list[int]) -> torch.Tensor:
        return self._fingerprints([prompt_ids])[0]

    def _fingerprints(self, rows: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """TopHash masks [n, d_ff] of token id lists (each row all prompt)."""
        batches = down_proj_inputs_in_batches(self.base_model, self._layer, rows, batch_size=batch_size,
                                              pad_id=pad_token_id(self._require_tokenizer()))
        return torch.cat([self._layer.tophash(activations, mask) for activations, mask in batches])

    # -- threshold calibration ------------------------------------------------------------------
    @exclusive
    def calibrate_threshold(self, unrelated_texts: Sequence[str] | None = None, *, max_edits: int = 200,
                            negative_quantile: float = 0.99, positive_quantile: float = 0.05) -> Calibration:
        """Set ``memoir_config.threshold`` from the stored edits and unrelated text, and return why.

        Negatives are ``unrelated_texts`` (default: the generic prompts shipped with memoir_hf);
        positives are up to ``max_edits`` stored edit prompts behind the model's context prefixes.
        The best overlap of unrelated text grows with the number of edits: calibrate after editing.
        """
        self._check_patched()
        if not len(self.store):
            raise MemoirError("calibrate_threshold needs stored edits: edit first, then calibrate.")
        if isinstance(unrelated_texts, str):
            raise MemoirError("unrelated_texts must be a list of strings, not one string.")
        if isinstance(max_edits, bool) or not isinstance(max_edits, int) or max_edits < 1:
            raise MemoirError(f"max_edits must be a positive int, got {max_edits!r}.")
        for name, quantile in (("negative_quantile", negative_quantile), ("positive_quantile", positive_quantile)):
            if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
                raise MemoirError(f"{name} must be a number in [0, 1], got {quantile!r}.")
        texts = (_text_list(unrelated_texts, "unrelated_texts must be a non-empty list of non-empty strings")
                 if unrelated_texts is not None else default_background_prompts())
        tokenizer = self._require_tokenizer()
        rows = [tokenizer(t)["input_ids"] for t in texts]
        self._check_fit(rows, "unrelated_texts")
        with self._inference_mode():
            _, negatives = self.store.nearest(self._fingerprints(rows))
            positives = self._prefixed_overlaps(self.store.records[:max_edits])
        calibration = choose_threshold(negatives, positives, negative_q=negative_quantile, positive_q=positive_quantile)
        self.memoir_config.threshold = calibration.threshold
        return calibration

    def _check_fit(self, rows: Sequence[Sequence[int]], name: str) -> None:
        """EditInputError naming the first of ``rows`` (token ids of ``name`` texts) longer than the context."""
        limit = self._context_length
        too_long = [i for i, row in enumerate(rows) if limit is not None and len(row) > limit]
        if too_long:
            raise EditInputError(f"{name}[{too_long[0]}] is {len(rows[too_long[0]])} tokens, longer than the model's "
                                 f"context of {limit}; shorten it.")

    def _prefixed_overlaps(self, records: Sequence[EditRecord]) -> np.ndarray:
        """Overlap of each edit prompt behind each context prefix with that edit's own mask."""
        self._ensure_prefixes()
        tokenizer = self._require_tokenizer()
        contexts = self.prefixes or [""]
        rows = [tokenizer(with_prefix(p, r.prompt) if p else r.prompt)["input_ids"] for r in records for p in contexts]
        limit = self._context_length
        if limit is not None:  # a long prompt behind a prefix may not fit the context: keep its end, the prompt
            rows = [row[-limit:] for row in rows]
        queries = self._fingerprints(rows).cpu().numpy().reshape(len(records), len(contexts), -1)
        own = np.stack([self.store.index.mask(position) for position in range(len(records))])
        return ((queries & own[:, None, :]).sum(-1) / self.target.top_k).ravel()

    def _edit_batch(self, prompt: str, encoded: EncodedFact, limit: int | None) -> EditBatch:
        self._ensure_prefixes()
        rows = [encoded.prompt_ids] + [self.tokenizer(with_prefix(p, prompt))["input_ids"] for p in self.prefixes]
        rows = [row for row in rows if limit is None or len(row) + len(encoded.target_ids) <= limit]
        return EditBatch.build(rows, encoded.target_ids, pad_id=pad_token_id(self.tokenizer), device=self._layer.device)

    def _frozen_prefix(self, batch: EditBatch) -> AbstractContextManager[None]:
        if self.edit_path == "naive":
            return nullcontext()
        target = self.target
        layers = self.base_model.get_submodule(target.layers_path)
        return reuse_frozen_prefix(self.base_model, layers, target.layer_index, target.mlp_in_layer, self._layer,
                                   batch.input_ids, batch.attention_mask, len(batch.target_ids))

    def _ensure_prefixes(self) -> None:
        """Generate the context prefixes at the first edit, and again once prefix_starts or prefix_lengths change."""
        settings = self._prefix_settings()
        if self.prefixes is None or settings != self._prefixes_from:
            with self._inference_mode(), self.router.preserved(), self.router.disabled():
                self.prefixes = generate_prefixes(self.base_model, self._require_tokenizer(), *settings)
            self._prefixes_from = settings

    def _prefix_settings(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        return tuple(self.memoir_config.prefix_starts), tuple(self.memoir_config.prefix_lengths)

    @torch.no_grad()
    def _check_edit(self, encoded: EncodedFact) -> tuple[float, int | None]:
        """Teacher-forced accuracy of the target after the plain prompt, read through routing."""
        input_ids = torch.tensor([encoded.ids], device=self._layer.device)
        prompt_mask = torch.zeros_like(input_ids)
        prompt_mask[:, :len(encoded.prompt_ids)] = 1
        with self._inference_mode(), self.router.preserved(), self.router.prompt_mask(prompt_mask):
            logits = target_logits(self.base_model, input_ids, torch.ones_like(input_ids), len(encoded.target_ids))
            routed = self.router.decisions[0].edit_id
        target = torch.tensor(encoded.target_ids, device=logits.device)
        return float((logits[0].argmax(-1) == target).float().mean()), routed

    @contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """Dropout off while the library runs the model itself (the caller's mode is restored), and the
        memory held shared as in a user's forward, so a hook in these passes cannot change the memory."""
        with self._memory_lock.shared(), self._eval_mode(self.base_model):
            yield

    # -- saving and loading -------------------------------------------------------------------
    @exclusive
    def save_pretrained(self, save_directory: str | os.PathLike, *, save_base: bool = False) -> None:
        """Write the memoir state (and, with ``save_base``, the base model and tokenizer) to a folder.

        The folder is written whole or not at all: a crash mid-save leaves the previous contents.
        Files already in the folder that this save does not write are kept.
        """
        self._check_patched()
        if not isinstance(save_base, bool):
            raise MemoirError(f"save_base must be True or False, got {save_base!r}.")
        if self.prefixes is not None:  # saved prefixes must come from the saved prefix settings
            self._ensure_prefixes()
        owned = MEMOIR_FILES + (BASE_MODEL_FILES if save_base else ())
        with atomic_folder(save_directory, owned=owned) as folder:
            if save_base:
                with self._original_layout():
                    save_base_model(self.base_model, self.tokenizer, folder)
            write_checkpoint(folder, manifest=self._manifest(),
                             memory_weight=self._layer.memory_weight, permutation=self._layer.tophash.permutation,
                             background=self._layer.tophash.background, spread=self._layer.tophash.spread,
                             earlier_keys=self.earlier_keys, store=self.store)

    @classmethod
    def from_pretrained(cls, model: nn.Module, checkpoint_directory: str | os.PathLike, tokenizer: Any = None, *,
                        use_faiss: bool | None = None) -> MemoirModel:
        """Attach saved edits to a loaded base model (the one they were made on; this is checked)."""
        recover_interrupted_swap(checkpoint_directory)
        return cls.attach(model, read_checkpoint(checkpoint_directory), tokenizer, use_faiss=use_faiss)

    @classmethod
    def attach(cls, model: nn.Module, checkpoint: Checkpoint, tokenizer: Any = None, *,
               use_faiss: bool | None = None) -> MemoirModel:
        """Attach an already read checkpoint to a base model (see from_pretrained)."""
        _refuse_double_patch(model)
        check_model_type(checkpoint.fingerprint, model)
        saved_k = checkpoint.manifest["target"].get("top_k")
        config = dataclasses.replace(checkpoint.config)
        object.__setattr__(config, "layer", checkpoint.module_name)
        resolved_k = find_target(model, config).top_k
        if resolved_k != saved_k:
            raise CheckpointError(f"{checkpoint.folder}: the saved masks have k={saved_k} active columns but the "
                                  f"saved config resolves to k={resolved_k}; the files do not belong together.")
        return cls(model, config, tokenizer, use_faiss=use_faiss, checkpoint=checkpoint)

    def _manifest(self) -> dict[str, Any]:
        target = self.target
        return {
            "library_version": __version__,
            "memoir_config": self.memoir_config.to_dict(),
            "target": {"model_type": target.model_type, "module_name": target.module_name,
                       "layer_index": target.layer_index, "d_model": target.d_model, "d_ff": target.d_ff,
                       "top_k": target.top_k},
            "base_model_fingerprint": _fingerprint_of(self.base_model, target, self._layer),
            "prefixes": self.prefixes,
            "next_edit_id": self.store.next_id,
            "base_model": self.base_model_source,
        }

    @torch.no_grad()
    def _restore(self, checkpoint: Checkpoint) -> None:
        layer = self._layer
        layer.memory_weight.copy_(checkpoint.memory_weight.to(layer.memory_weight.device, layer.memory_weight.dtype))
        layer.tophash.permutation.copy_(checkpoint.permutation.to(layer.tophash.permutation.device))
        layer.tophash.background.copy_(checkpoint.background.to(layer.tophash.background.device))
        layer.tophash.spread.copy_(checkpoint.spread.to(layer.tophash.spread.device))
        self.earlier_keys = checkpoint.earlier_keys
        if self.earlier_keys is not None:
            self.earlier_keys.moment_sum = self.earlier_keys.moment_sum.to(layer.device)
        restore_store(checkpoint, self.store)
        self.prefixes = checkpoint.manifest.get("prefixes")
        self._prefixes_from = self._prefix_settings()
        self.base_model_source = checkpoint.manifest.get("base_model")

    @contextmanager
    def _original_layout(self) -> Iterator[None]:
        """The base model exactly as before patching, for the duration of the block."""
        parent = self.base_model.get_submodule(self.target.parent_name)
        setattr(parent, self.target.attribute, self._layer.base_layer)
        try:
            yield
        finally:
            setattr(parent, self.target.attribute, self._layer)

    # -- unpatching -------------------------------------------------------------------------
    @exclusive
    def unpatch(self) -> nn.Module:
        """Put the original down projection back and return the base model, exactly as it was."""
        self._check_patched()
        model = self.base_model
        self._hook.remove()
        setattr(model.get_submodule(self.target.parent_name), self.target.attribute, self._layer.base_layer)
        self._layer.router = None
        self._patched = False
        del self.base_model
        return model

    def _check_patched(self) -> None:
        if not self.__dict__.get("_patched", False):
            raise PatchError("this MemoirModel was unpatched: its edits can no longer be used or saved "
                             "(save_pretrained before unpatch() keeps them); patch the model again with "
                             "memoir_hf.patch(...).")

    def __repr__(self) -> str:
        state = f"{len(self.store)} edits" if self.__dict__.get("_patched") else "unpatched"
        return f"MemoirModel({self.target.module_name}, k={self.target.top_k}/{self.target.d_ff}, {state})"


def _fingerprint_of(model: nn.Module, target: PatchTarget, layer: MemoirLayer | None = None) -> dict[str, Any]:
    down_proj = layer.base_layer if layer is not None else model.get_submodule(target.module_name)
    with loaded_weight(down_proj) as weight:
        return base_fingerprint(model, target, weight, conv1d=isinstance(down_proj, Conv1D))


def _text_list(texts: Any, refusal: str) -> list[str]:
    """``texts`` as a list of non-empty strings of valid Unicode, else MemoirError starting with ``refusal``."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise MemoirError(f"{refusal}, got {type(texts).__name__}.")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise MemoirError(f"{refusal}.")
    if not all(valid_unicode(t) for t in texts):
        raise MemoirError(f"{refusal}; one is not valid Unicode text (it holds a lone surrogate).")
    return texts


def _finite_in(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value is finite, also once stored in ``dtype`` (fp16 overflows past 65504)."""
    return bool(torch.isfinite(values.to(dtype)).all())


def _check_prompt_mask(mask: Any) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise MemoirError(f"prompt_mask must be a [batch, seq] torch tensor of 0/1, got {type(mask).__name__}"
                          + (f" of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else "") + ".")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise MemoirError("prompt_mask must hold only 0 and 1 (1 on prompt tokens).")


def _check_config_and_tokenizer(config: Any, tokenizer: Any) -> None:
    """The two arguments users swap or pass in another form: refused with what to pass instead."""
    check_config(config)
    if tokenizer is not None and not callable(tokenizer):
        raise PatchError(f"tokenizer must be a loaded tokenizer (AutoTokenizer.from_pretrained(...)), "
                         f"got {type(tokenizer).__name__}.")


def _refuse_double_patch(model: nn.Module) -> None:
    if isinstance(model, MemoirModel):
        raise PatchError("this model is already a MemoirModel; edit it directly, or unpatch() it first.")
    if not isinstance(model, nn.Module):
        raise PatchError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}.")
    if any(isinstance(module, MemoirLayer) for module in model.modules()):
        raise PatchError("this model is already patched by another MemoirModel; call unpatch() on that one first.")


def patch(model: nn.Module, config: MemoirConfig | None = None, tokenizer: Any = None, *,
          use_faiss: bool | None = None) -> MemoirModel:
    """Patch ``model`` with a MEMOIR memory and return the MemoirModel that edits and reads it.

    ``use_faiss`` picks the mask index backend: None uses FAISS when importable, else exact NumPy.
    """
    return MemoirModel(model, config, tokenizer, use_faiss=use_faiss)


__all__ = ["MemoirModel", "PatchTarget", "patch"]

"""A teacher whose output is its K-V cache (`teacher_need="kv"`, algorithm kv_distill).

`score(batch, plan)` appends one `LayerKV` to `batch.teacher_kv`: L_t × [B,H_t,P+T,D_t] on
the student's sequence layout (prompt left-padded, response right-padded), keys with the
teacher's RoPE undone, 0 at the student's padding. A teacher that reads exactly the
student's tokens (same vocabulary, no prefix) runs on the student's ids, mask and positions:
nothing to align. A teacher with a `prefix` or another tokenizer reads the decoded text
(prefix ⧺ prompt ⧺ completion) and its KV is aligned onto the student's real tokens
(`plan.kv_time_align`: resample, segment or char), then scattered into the padded layout.
With a cache directory it is a caching teacher: rows already scored are read from disk
(`protege.kv.store`), only the rest run through the model. Other needs go to the plain
`TeacherScorer`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from torch import Tensor

from protege.actors.teacher import TeacherScorer
from protege.kv.batch import KVBatch, make_batch
from protege.kv.cache import LayerKV
from protege.kv.extract import KVSpec, forward_kv, forward_sequences, to_student_time
from protege.kv.rope import undo_rope
from protege.kv.store import KVStore, RowKV, files_signature
from protege.memory import peak_metrics
from protege.modeling import load_tokenizer, sequence_inputs
from protege.records import RolloutBatch, RolloutPlan


def kv_cache_dir(spec, config) -> str | None:
    """Where teacher `spec` caches its KV rows (None: no cache)."""
    if not spec.kv_cache:
        return None
    return spec.kv_cache_dir or str(Path(config.output_dir) / "teacher_kv" / spec.name)


class KVTeacherScorer:
    """A frozen teacher serving its KV cache on the student's layout (a Ray actor elsewhere)."""

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        micro_batch_size: int = 64,
        student_tokenizer: str | None = None,
        prefix: str = "",
        cache_dir: str | None = None,
    ) -> None:
        self.scorer = TeacherScorer(model, dtype, micro_batch_size)
        self.model, self.micro_batch_size = self.scorer.model, micro_batch_size
        self.spec = KVSpec.from_config(self.model.config)
        self.tokenizer = load_tokenizer(model)
        self.student_tokenizer = (
            load_tokenizer(student_tokenizer) if student_tokenizer else self.tokenizer
        )
        self.prefix = prefix
        self.same_tokens = not prefix and (
            self.tokenizer.get_vocab() == self.student_tokenizer.get_vocab()
        )
        self.signature = f"{files_signature(model)}|{dtype}|prefix={prefix!r}"
        if not self.same_tokens:  # the teacher reads what the student's tokens decode to
            vocab = sorted(self.student_tokenizer.get_vocab().items())
            self.signature += "|student=" + hashlib.sha256(repr(vocab).encode()).hexdigest()
        self.cache_dir = cache_dir
        self._stores: dict[str, KVStore] = {}
        self.forward_rows = 0  # rows run through the model so far (tests read it)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        if plan.teacher_need != "kv":
            return self.scorer.score(batch, plan)
        started = time.perf_counter()
        rows, hits = self.row_kv(batch, plan.kv_time_align)
        kv = scatter_rows(rows, batch)
        extras = {
            "teacher/seconds": time.perf_counter() - started,
            "teacher/tokens": batch.num_response_tokens,
            "teacher/payload_bytes": float(kv.nbytes),
            "teacher/kv_cache_hit_count": float(hits),
        }
        merged = dict(batch.extras)
        for key, value in extras.items():  # several teachers score one shard in turn
            merged[key] = merged.get(key, 0.0) + value
        merged.update(peak_metrics("teacher"))
        return batch.replace(teacher_kv=(*(batch.teacher_kv or ()), kv), extras=merged)

    # -- rows ------------------------------------------------------------------------------
    def row_kv(self, batch: RolloutBatch, mode: str) -> tuple[list[RowKV], int]:
        """Per row, per teacher layer: (K, V) [H_t,n,D_t] at the row's n real tokens (cached
        rows read from disk), and how many rows were cache hits."""
        store = self._store(mode)
        ids, mask, _ = sequence_inputs(batch)
        real, prompts = mask.bool(), batch.prompt_mask.sum(-1).tolist()
        keys = [
            store.row_key([prompts[b], *ids[b][real[b]].tolist()]) if store else ""
            for b in range(batch.size)
        ]
        found = store.get(keys) if store else [None] * batch.size
        missing = [b for b, row in enumerate(found) if row is None]
        computed: list[RowKV] = []
        for start in range(0, len(missing), self.micro_batch_size):
            part = batch.select(missing[start : start + self.micro_batch_size])
            computed.extend(self._compute(part, mode))
        self.forward_rows += len(missing)
        if store:
            store.put({keys[b]: row for b, row in zip(missing, computed)})
        for b, row in zip(missing, computed):
            found[b] = row
        return found, batch.size - len(missing)

    def _store(self, mode: str) -> KVStore | None:
        if self.cache_dir is None:
            return None
        if mode not in self._stores:
            align = "same-tokens" if self.same_tokens else mode
            self._stores[mode] = KVStore(self.cache_dir, f"{self.signature}|align={align}")
        return self._stores[mode]

    @torch.no_grad()
    def _compute(self, batch: RolloutBatch, mode: str) -> list[RowKV]:
        real = sequence_inputs(batch)[1].bool()
        if self.same_tokens:
            ids, mask, positions = sequence_inputs(batch)
            kv = forward_sequences(self.model, ids, mask, positions, self.spec).kv
            positions = positions.to(kv.keys[0].device)
            keys = [undo_rope(k, positions, self.spec.rope).float().cpu() for k in kv.keys]
            values = [v.float().cpu() for v in kv.values]
            return [
                [(k[b][:, real[b]], v[b][:, real[b]]) for k, v in zip(keys, values)]
                for b in range(batch.size)
            ]
        student, rows = self._student_rows(batch)
        teacher = make_batch(self.tokenizer, rows, self.prefix)
        kv = forward_kv(self.model, teacher, self.spec).kv
        aligned = to_student_time(kv, teacher, student, self.spec, mode)
        lengths = student.lengths.tolist()
        return [
            [(k[b, :, :n].float().cpu(), v[b, :, :n].float().cpu()) for k, v in _pairs(aligned)]
            for b, n in enumerate(lengths)
        ]

    def _student_rows(self, batch: RolloutBatch) -> tuple[KVBatch, list[dict[str, str]]]:
        """The student's real tokens of every row, right-packed, with the character span of
        each token in the decoded text (what char alignment compares), and the decoded
        prompt and completion texts the teacher reads."""
        ids, mask, _ = sequence_inputs(batch)
        prompt_lengths = batch.prompt_mask.sum(-1)
        tokens = [ids[b][mask[b].bool()] for b in range(batch.size)]
        width = max(len(t) for t in tokens)
        input_ids = torch.zeros(batch.size, width, dtype=torch.long)
        attention = torch.zeros(batch.size, width, dtype=torch.bool)
        offsets, texts = [], []
        for b, row in enumerate(tokens):
            input_ids[b, : len(row)], attention[b, : len(row)] = row, True
            pieces = [self.student_tokenizer.decode([token]) for token in row.tolist()]
            ends = torch.tensor([len(piece) for piece in pieces]).cumsum(0).tolist()
            offsets.append(tuple(zip([0, *ends[:-1]], ends)))
            p = int(prompt_lengths[b])
            texts.append({"prompt": "".join(pieces[:p]), "completion": "".join(pieces[p:])})
        columns = torch.arange(width)[None]
        return KVBatch(
            input_ids=input_ids,
            attention_mask=attention,
            answer_mask=(columns >= prompt_lengths[:, None]) & attention,
            prompt_lengths=prompt_lengths,
            task_ids=torch.zeros(batch.size, dtype=torch.long),
            offsets=tuple(offsets),
        ), texts


def _pairs(kv: LayerKV) -> list[tuple[Tensor, Tensor]]:
    return list(zip(kv.keys, kv.values))


def scatter_rows(rows: list[RowKV], batch: RolloutBatch) -> LayerKV:
    """Per-row KV at real tokens -> L × [B,H_t,P+T,D_t] on the student's layout (0 at pads)."""
    real = sequence_inputs(batch)[1].bool()
    keys, values = [], []
    for layer in range(len(rows[0])):
        heads, _, dim = rows[0][layer][0].shape
        k = torch.zeros(batch.size, heads, real.shape[1], dim)
        v = torch.zeros_like(k)
        for b, row in enumerate(rows):
            k[b][:, real[b]], v[b][:, real[b]] = row[layer]
        keys.append(k)
        values.append(v)
    return LayerKV(tuple(keys), tuple(values))

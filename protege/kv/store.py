"""Offline teacher KV: precompute once to safetensors shards, train by reading them back.

Layout of a directory: `index.json` (teachers, layer counts, shard files, a fingerprint of
what was extracted) and `shard_00000.safetensors`, … each holding the student's batch
tensors (`input_ids`, `attention_mask`, `answer_mask`, `prompt_lengths`, `task_ids`) and,
per teacher i and teacher layer j, `t{i}.k{j}` / `t{i}.v{j}` [N,H_t,T,D_t] — already on the
student's time axis, keys without RoPE (see `TeacherKVWorker.extract`). A directory whose
fingerprint matches is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from protege.kv.batch import KVBatch
from protege.kv.extract import LayerKV
from protege.kv.time_align import pad_time

BATCH_FIELDS = ("input_ids", "attention_mask", "answer_mask")


@dataclass(frozen=True)
class KVTable:
    """Every row's student batch and aligned teacher KV, padded to one width."""

    batch: KVBatch
    kv: tuple[LayerKV, ...]  # one per teacher; tensors [N,H_t,T,D_t]

    def __len__(self) -> int:
        return self.batch.input_ids.shape[0]

    def sample(self, index: Tensor) -> tuple[KVBatch, list[LayerKV]]:
        """Rows `index`, trimmed to their longest real length."""
        batch = self.batch.select(index)
        width = batch.input_ids.shape[1]
        kv = [
            LayerKV(
                tuple(k[index, :, :width] for k in t.keys),
                tuple(v[index, :, :width] for v in t.values),
            )
            for t in self.kv
        ]
        return batch, kv


def fingerprint(rows: Sequence[dict], teachers: Sequence[str]) -> str:
    text = json.dumps(
        {"rows": [r["prompt"] + r["completion"] for r in rows], "teachers": list(teachers)}
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_store(
    directory: str | Path,
    rows: Sequence[dict],
    teachers: Sequence[str],
    make_student: Callable[[list[dict]], KVBatch],
    extract: Callable[[list[dict], KVBatch], list[LayerKV]],
    shard_rows: int = 512,
) -> Path:
    """Extract every teacher's KV for `rows` in shards and write them (skipped when the
    directory already holds the same fingerprint). `teachers` describes the teachers (model,
    prefix, alignment) for the fingerprint; `extract(rows, student_batch)` returns one
    LayerKV per teacher."""
    directory = Path(directory)
    key = fingerprint(rows, teachers)
    index_path = directory / "index.json"
    if index_path.exists() and json.loads(index_path.read_text()).get("fingerprint") == key:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(rows), shard_rows)):
        chunk = list(rows[start : start + shard_rows])
        student = make_student(chunk)
        tensors = {name: getattr(student, name).contiguous() for name in BATCH_FIELDS}
        tensors["prompt_lengths"] = student.prompt_lengths
        tensors["task_ids"] = student.task_ids
        for i, kv in enumerate(extract(chunk, student)):
            for j, (k, v) in enumerate(zip(kv.keys, kv.values)):
                tensors[f"t{i}.k{j}"], tensors[f"t{i}.v{j}"] = k.contiguous(), v.contiguous()
        name = f"shard_{number:05d}.safetensors"
        save_file(tensors, str(directory / name))
        shards.append(name)
    layers = [sum(1 for key in tensors if key.startswith(f"t{i}.k")) for i in range(len(teachers))]
    index = {
        "fingerprint": key,
        "teachers": list(teachers),
        "layers": layers,
        "rows": len(rows),
        "shards": shards,
    }
    index_path.write_text(json.dumps(index, indent=2))
    return directory


def read_store(directory: str | Path) -> KVTable:
    """All shards, concatenated and right-padded to the widest (never truncated)."""
    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    shards = [load_file(str(directory / name)) for name in index["shards"]]
    width = max(s["input_ids"].shape[1] for s in shards)

    def cat(name: str, is_kv: bool = False) -> Tensor:
        parts = []
        for s in shards:
            x, mask = s[name], s["attention_mask"]
            if is_kv:
                x, _ = pad_time(x, mask, width, dim=2)
            elif x.dim() == 2:
                x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
            parts.append(x)
        return torch.cat(parts)

    n = index["rows"]
    batch = KVBatch(
        input_ids=cat("input_ids"),
        attention_mask=cat("attention_mask").bool(),
        answer_mask=cat("answer_mask").bool(),
        prompt_lengths=cat("prompt_lengths"),
        task_ids=cat("task_ids"),
        offsets=tuple(() for _ in range(n)),
    )
    kv = tuple(
        LayerKV(
            tuple(cat(f"t{i}.k{j}", True) for j in range(layers)),
            tuple(cat(f"t{i}.v{j}", True) for j in range(layers)),
        )
        for i, layers in enumerate(index["layers"])
    )
    return KVTable(replace(batch), kv)

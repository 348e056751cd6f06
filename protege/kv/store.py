"""The caching KV teacher's disk store: scored rows' KV in safetensors shards, keyed by content.

A row's key is a hash of what determines its KV: the teacher (resolved model path, the
names/sizes/mtimes of its files, dtype), its prefix, the time alignment and the row's
tokens. Retrained weights at the same path, another prefix or alignment give new keys
instead of stale hits. Each `put` writes one shard `kv_<uuid>.safetensors` (atomically: a
temporary file renamed), whose tensors are `<key>.k<j>` / `<key>.v<j>` [H_t,n,D_t] for the
row's n real tokens on the student's layout; `get` reads the rows it finds, and rescans the
directory on a miss (several teacher workers may share it).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from protege.modeling import resolve_path

RowKV = list[tuple[Tensor, Tensor]]  # per teacher layer: (K, V) [H_t,n,D_t]


def files_signature(model: str) -> str:
    """The resolved path plus names, sizes and mtimes of a model directory's files."""
    path = Path(resolve_path(model))
    if not path.is_dir():
        return str(path)
    files = ";".join(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(path.iterdir())
        if f.is_file()
    )
    return f"{path}|{files}"


class KVStore:
    """Keyed teacher-KV rows on disk (see the module docstring)."""

    def __init__(self, directory: str | Path, fingerprint: str, memory_bytes: int = 1 << 30):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        # Rows recently written or read stay in memory too (least recently used evicted past
        # `memory_bytes`): from the second epoch on, a small data set is served from RAM.
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, RowKV] = OrderedDict()
        self._memory_used = 0
        self._where: dict[str, tuple[str, int]] = {}  # key -> (shard file, layers)
        self._scanned: set[str] = set()
        self.refresh()

    def row_key(self, tokens: Sequence[int]) -> str:
        text = json.dumps([self.fingerprint, list(tokens)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def refresh(self) -> None:
        """Index shards written since the last scan (by this or another worker)."""
        for path in sorted(self.directory.glob("kv_*.safetensors")):
            if path.name in self._scanned:
                continue
            with safe_open(str(path), framework="pt") as shard:
                layers = int(shard.metadata()["layers"])
                for name in shard.keys():  # noqa: SIM118 (safe_open is not iterable)
                    key, _, kind = name.partition(".")
                    if kind == "k0":
                        self._where[key] = (path.name, layers)
            self._scanned.add(path.name)

    def get(self, keys: Sequence[str]) -> list[RowKV | None]:
        """The stored rows for `keys` (None where a key is not stored)."""
        out: list[RowKV | None] = [self._recall(key) for key in keys]
        if any(row is None and key not in self._where for row, key in zip(out, keys)):
            self.refresh()
        by_file: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if out[i] is None and key in self._where:
                by_file.setdefault(self._where[key][0], []).append(i)
        for name, rows in by_file.items():
            with safe_open(str(self.directory / name), framework="pt") as shard:
                for i in rows:
                    layers = self._where[keys[i]][1]
                    out[i] = [
                        (shard.get_tensor(f"{keys[i]}.k{j}"), shard.get_tensor(f"{keys[i]}.v{j}"))
                        for j in range(layers)
                    ]
                    self._remember(keys[i], out[i])
        return out

    def put(self, rows: dict[str, RowKV]) -> None:
        """Write `rows` (key -> per-layer K, V) as one new shard."""
        if not rows:
            return
        layers = {len(row) for row in rows.values()}
        if len(layers) != 1:
            raise ValueError(f"rows of one teacher must have one layer count, got {layers}")
        tensors = {}
        for key, row in rows.items():
            for j, (k, v) in enumerate(row):
                tensors[f"{key}.k{j}"] = k.contiguous().clone()
                tensors[f"{key}.v{j}"] = v.contiguous().clone()
        name = f"kv_{uuid.uuid4().hex}.safetensors"
        temporary = self.directory / f".{name}.tmp"
        save_file(tensors, str(temporary), metadata={"layers": str(layers.pop())})
        os.replace(temporary, self.directory / name)
        self.refresh()
        for key, row in rows.items():
            self._remember(key, [(k.clone(), v.clone()) for k, v in row])

    def _recall(self, key: str) -> RowKV | None:
        row = self._memory.get(key)
        if row is not None:
            self._memory.move_to_end(key)
        return row

    def _remember(self, key: str, row: RowKV) -> None:
        if key in self._memory:
            return
        self._memory[key] = row
        self._memory_used += sum(k.nbytes + v.nbytes for k, v in row)
        while self._memory_used > self.memory_bytes and self._memory:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= sum(k.nbytes + v.nbytes for k, v in old)

"""A KV-distillation run, top to bottom: teachers → (offline shards) → learner → eval → plots.

    run = KVRun(config)         # teachers as workers (in-process or Ray actors), layer maps
    summary = run.train()       # accuracy/perplexity before → after, per-step metrics, plots

The teachers are `TeacherKVWorker`s behind a launcher (`LocalLauncher` or `RayLauncher`);
with `trainer.offline` their KV is precomputed once to safetensors shards and the loop
only reads from disk.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from protege.kv.batch import TASKS, KVBatch, carry_task, make_batch
from protege.kv.config import KVDistillConfig
from protege.kv.extract import KVSpec, LayerKV, TeacherKVWorker
from protege.kv.fusion import task_weight_table
from protege.kv.layer_align import (
    LayerMap,
    cka_layer_map,
    hidden_states_for_cka,
    proportional_layer_map,
)
from protege.kv.learner import KVLearner
from protege.kv.store import KVTable, read_store, write_store
from protege.launch import LocalLauncher, Resources
from protege.modeling import load_model, load_tokenizer, resolve_path
from protege.tasks.tiny import load_rows


@dataclass
class History:
    """What the plots and the summary read."""

    steps: list[int] = field(default_factory=list)
    layer_mse: list[list[float]] = field(default_factory=list)  # [steps][student layers]
    train_kv: list[float] = field(default_factory=list)
    heldout_kv: list[float] = field(default_factory=list)
    routing: Tensor | None = None  # [samples,n] on the held-out rows at the end


def _files_signature(model: str) -> str:
    """Names, sizes and mtimes of a model directory's files: retrained weights at the same
    path give a new store fingerprint instead of a stale cache."""
    path = Path(resolve_path(model))
    if not path.is_dir():
        return ""
    return ";".join(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
        for f in sorted(path.iterdir())
        if f.is_file()
    )


def _launcher(kind: str):
    if kind == "local":
        return LocalLauncher()
    from protege.actors.ray_actors import RayLauncher  # ray is imported only there

    return RayLauncher()


class KVRun:
    def __init__(self, config: KVDistillConfig):
        self.config = config
        torch.manual_seed(config.trainer.seed)
        self.rng = random.Random(config.trainer.seed)
        self.output = Path(config.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        self.train_rows = load_rows(resolve_path(config.data.train))[: config.data.train_rows]
        self.test_rows = load_rows(resolve_path(config.data.test))
        self.heldout_rows = self.test_rows[: config.data.heldout_rows]
        self.tokenizer = load_tokenizer(config.student)
        self.teachers = config.effective_teachers()
        self.launcher = _launcher(config.trainer.workers)
        resources = [
            Resources(config.trainer.teacher_num_cpus, config.trainer.teacher_num_gpus)
        ] * len(self.teachers)
        args = [(t.model, t.prefix, config.align.time) for t in self.teachers]
        self.workers = self.launcher.spawn("kv-teacher", TeacherKVWorker, resources, args)
        self.specs: list[KVSpec] = self.launcher.get([w.kv_spec.remote() for w in self.workers])
        self.layer_maps = self._layer_maps()
        task_table = self._task_table() if config.fusion.kind == "task" else None
        self.learner = KVLearner(config, self.specs, self.layer_maps, task_table)
        self.table = (
            self._offline_table(self.train_rows, "train") if config.trainer.offline else None
        )
        self.heldout = self._offline_table(self.heldout_rows, "heldout")

    # -- set-up --------------------------------------------------------------------------
    def _student_batch(self, rows: list[dict]) -> KVBatch:
        return make_batch(self.tokenizer, rows)

    def _extract(self, rows: list[dict], student: KVBatch) -> list[LayerKV]:
        return self.launcher.get([w.extract.remote(rows, student) for w in self.workers])

    def _offline_table(self, rows: list[dict], split: str) -> KVTable:
        kv_dir = Path(self.config.trainer.kv_dir or self.output / "teacher_kv") / split
        described = [
            f"{t.model}|{_files_signature(t.model)}|{t.prefix}|{self.config.align.time}"
            for t in self.teachers
        ]
        write_store(
            kv_dir,
            rows,
            described,
            self._student_batch,
            self._extract,
            self.config.trainer.shard_rows,
        )
        return read_store(kv_dir)

    def _layer_maps(self) -> list[LayerMap]:
        student_layers = KVSpec.from_config(load_model(self.config.student).config).layers
        align = self.config.align
        if align.layers == "proportional":
            return [
                proportional_layer_map(s.layers, student_layers, align.interpolate)
                for s in self.specs
            ]
        rows = self.train_rows[: align.cka_rows]
        batch = self._student_batch(rows)
        student_hidden = hidden_states_for_cka(
            load_model(self.config.student), batch.input_ids, batch.attention_mask.long()
        )
        maps = []
        for teacher, hidden in zip(
            self.teachers, self.launcher.get([w.hidden_states.remote(rows) for w in self.workers])
        ):
            if hidden[0].shape[0] != student_hidden[0].shape[0]:
                raise ValueError(
                    f"align.layers=cka: teacher {teacher.name!r} reads {hidden[0].shape[0]} tokens but the "
                    f"student {student_hidden[0].shape[0]} (a prefix or another tokenizer); use proportional"
                )
            maps.append(
                cka_layer_map(student_hidden, hidden, align.cka_top_k, align.cka_temperature)
            )
        return maps

    def _task_table(self) -> Tensor:
        """[tasks,n]: softmax over teachers of -(mean answer NLL on that task's rows)."""
        rows = self.train_rows[:256]
        nll = torch.stack(
            self.launcher.get([w.answer_nll.remote(rows) for w in self.workers]), -1
        )  # [B,n]
        task = torch.tensor([TASKS.index(carry_task(r)) for r in rows])
        per_task = torch.stack(
            [
                nll[task == t].mean(0) if (task == t).any() else nll.mean(0)
                for t in range(len(TASKS))
            ]
        )
        return task_weight_table(per_task, self.config.fusion.task_temperature)

    # -- the loop ------------------------------------------------------------------------
    def next_batch(self) -> tuple[KVBatch, list[LayerKV]]:
        size = min(self.config.trainer.batch_size, len(self.train_rows))
        index = sorted(self.rng.sample(range(len(self.train_rows)), size))
        if self.table is not None:
            return self.table.sample(torch.tensor(index))
        rows = [self.train_rows[i] for i in index]
        student = self._student_batch(rows)
        return student, self._extract(rows, student)

    def heldout_loss(self) -> tuple[float, Tensor | None]:
        out = self.learner.evaluate_kv(*self.heldout.sample(torch.arange(len(self.heldout))))
        return out.metrics.get("kv/loss", 0.0), out.routing

    def evaluate(self) -> dict[str, float]:
        rows = self.test_rows[: self.config.trainer.eval_size]
        return {
            "accuracy": self.learner.accuracy(rows),
            "perplexity": self.learner.perplexity(rows),
        }

    def train(self) -> dict[str, Any]:
        before = self.evaluate()
        history, seconds = self._loop()
        if self.config.distill and len(self.teachers) > 1:
            _, history.routing = self.heldout_loss()
        after = self.evaluate()
        summary = {
            "before": before,
            "after": after,
            "train_seconds": round(seconds, 2),
            "steps": self.config.trainer.steps,
            "teachers": [t.model_dump() for t in self.teachers],
            "layer_maps": self.layer_maps,
            "final_train_kv": history.train_kv[-1] if history.train_kv else None,
            "heldout_kv": history.heldout_kv,
        }
        if self.config.trainer.plots and self.config.distill:
            summary["plots"] = self.plot(history)
        (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
        self.history = history
        return summary

    def _loop(self) -> tuple[History, float]:
        """The training steps; every `log_every` steps the held-out KV loss and a log line."""
        cfg, history = self.config.trainer, History()
        start = time.perf_counter()
        with open(self.output / "metrics.jsonl", "w", encoding="utf-8") as log:
            for step in range(cfg.steps):
                batch, teacher_kv = self.next_batch()
                out = self.learner.train(batch, teacher_kv, step)
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    heldout, _ = self.heldout_loss() if self.config.distill else (0.0, None)
                    history.steps.append(step)
                    history.layer_mse.append(out.layer_mse)
                    history.train_kv.append(out.metrics.get("kv/loss", 0.0))
                    history.heldout_kv.append(heldout)
                    record = {"step": step, **out.metrics, "kv/heldout_loss": heldout}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
        return history, time.perf_counter() - start

    def plot(self, history: History) -> list[str]:
        from protege.kv import plots  # matplotlib only when plotting

        names = [t.name for t in self.teachers]
        paths = [
            plots.layer_heatmap(
                history.steps, history.layer_mse, self.output / "kv_mse_heatmap.png"
            ),
            plots.loss_curves(
                history.steps, history.train_kv, history.heldout_kv, self.output / "kv_loss.png"
            ),
        ]
        if history.routing is not None:
            paths.append(
                plots.routing_weights(history.routing, names, self.output / "routing_weights.png")
            )
        paths.append(self._alignment_plot())
        return [str(p) for p in paths]

    def _alignment_plot(self) -> Path:
        """Time alignment of the first held-out row for the last teacher (the identity when
        teacher and student read the same tokens)."""
        from protege.kv import plots
        from protege.kv.batch import alignment_matrices

        rows = self.heldout_rows[:1]
        teacher = self.teachers[-1]
        student = self._student_batch(rows)
        teacher_batch = make_batch(load_tokenizer(teacher.model), rows, teacher.prefix)
        align = alignment_matrices(student, teacher_batch, self.config.align.time)
        matrix = torch.eye(student.input_ids.shape[1]) if align is None else align[0]
        labels_s = [self.tokenizer.decode([i]) for i in student.input_ids[0].tolist()]
        labels_t = [self.tokenizer.decode([i]) for i in teacher_batch.input_ids[0].tolist()]
        return plots.alignment_matrix(
            matrix, labels_s, labels_t, self.output / "time_alignment.png"
        )

    def shutdown(self) -> None:
        if hasattr(self.launcher, "shutdown"):
            self.launcher.shutdown()


def run_kv_distill(config: KVDistillConfig) -> dict[str, Any]:
    run = KVRun(config)
    try:
        return run.train()
    finally:
        run.shutdown()

"""PNG visuals of a KV-distillation run (matplotlib, Agg backend, imported only here):
per-layer × step KV-MSE heatmap, train/held-out KV loss, routing weights (sample × teacher),
and a time-alignment matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def layer_heatmap(steps: Sequence[int], layer_mse: Sequence[Sequence[float]], path: Path) -> Path:
    """Rows: student layers; columns: logged steps; colour: (MSE(K) + MSE(V)) / 2."""
    data = torch.tensor(layer_mse, dtype=torch.float32).T  # [layers, steps]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(steps) + 2), 1 + 0.5 * data.shape[0]))
    image = ax.imshow(data.numpy(), aspect="auto", cmap="viridis")
    every = max(1, len(steps) // 15)  # at most ~15 step labels
    ticks = list(range(0, len(steps), every))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(range(data.shape[0]), [f"layer {i}" for i in range(data.shape[0])])
    ax.set_xlabel("step")
    ax.set_title("KV MSE per student layer")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def loss_curves(
    steps: Sequence[int], train: Sequence[float], heldout: Sequence[float], path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(steps, train, label="train (annealed layers)")
    ax.plot(steps, heldout, label="held-out (all layers)")
    ax.set_xlabel("step")
    ax.set_ylabel("KV loss")
    ax.legend()
    return _save(fig, path)


def routing_weights(
    weights: torch.Tensor, teachers: Sequence[str], path: Path, max_samples: int = 64
) -> Path:
    """weights [samples,n]: each sample's mean α per teacher."""
    data = weights[:max_samples].float().numpy()
    fig, ax = plt.subplots(figsize=(max(4, 0.12 * data.shape[0] + 2), 1.2 + 0.4 * data.shape[1]))
    image = ax.imshow(data.T, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(teachers)), list(teachers))
    ax.set_xlabel("held-out sample")
    ax.set_title("routing weights")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def alignment_matrix(
    matrix: torch.Tensor, student_tokens: Sequence[str], teacher_tokens: Sequence[str], path: Path
) -> Path:
    """matrix [T_s,T_t]: how much each teacher step feeds each student step."""
    fig, ax = plt.subplots(figsize=(1 + 0.35 * matrix.shape[1], 1 + 0.35 * matrix.shape[0]))
    ax.imshow(matrix.float().numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(teacher_tokens)), list(teacher_tokens), fontsize=7)
    ax.set_yticks(range(len(student_tokens)), list(student_tokens), fontsize=7)
    ax.set_xlabel("teacher token")
    ax.set_ylabel("student token")
    ax.set_title("time alignment")
    return _save(fig, path)

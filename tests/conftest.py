"""Shared fixtures: tiny locally built models (no network), and thread settings."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


def _vllm_missing() -> str | None:
    """Why vLLM tests cannot run here, or None (imported once, only when such tests exist)."""
    try:
        import vllm  # noqa: F401
    except (ImportError, RuntimeError, OSError) as error:  # absent, or a broken install
        return f"vllm is not importable ({type(error).__name__}: {error}); see .ci/run's vllm tier"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    marked = [item for item in items if item.get_closest_marker("vllm")]
    reason = _vllm_missing() if marked else None
    for item in marked if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """A character tokenizer and two differently seeded, differently shaped random tiny
    models (a teacher equal to the student would make 'loss decreases' tests meaningless)."""
    from protege.tasks.tiny_models import build_char_tokenizer, build_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer()
    teacher, student = build_tiny_models(seed=123)
    dirs = {"teacher": str(root / "teacher"), "student": str(root / "student")}
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    dirs["tokenizer"] = dirs["student"]
    return dirs


@pytest.fixture(scope="module")
def own_ray_instance():
    """One protege-started Ray instance for a module (RayLauncher reuses it); the module
    asks for it with `pytest.mark.usefixtures("own_ray_instance")`."""
    import ray

    from protege.actors.ray_actors import init_ray

    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    init_ray()
    yield
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS") if saved is None else os.environ.update(RAY_ADDRESS=saved)

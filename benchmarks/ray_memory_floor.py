"""The least memory a Ray run of the real-model GKD job can take, measured part by part.

A Ray run has, besides the models, Ray's own servers, a driver and one Python process per
role, each with torch and transformers loaded. This script starts protege's own Ray
instance, then two actors that import exactly what the learner's and the colocated
sampler's processes import and hold nothing, and measures every process (RSS: shared pages
once per process, the issue's unit; PSS: shared pages split). To that it adds the bytes
the job cannot avoid holding: the learner's float32 weights, gradients and two AdamW
moments, and the sampler's copy of the student plus the teacher. The sum is a floor: no
activation, logits, batch or weight update in flight is counted.

    python benchmarks/ray_memory_floor.py --pair /tmp/smollm2 \
        [--job-json benchmarks/results/real_model_ray_coloc.json] [--teacher-dtype bfloat16]

prints a table and writes benchmarks/results/ray_memory_floor.{json,md} (`--name`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tree_memory import GIB, role_of

# What each role's process imports before it builds its model (protege.actors.*).
LEARNER_IMPORTS = ["protege.actors.learner"]
SAMPLER_IMPORTS = ["protege.actors.colocated", "protege.actors.sampler", "protege.actors.teacher"]


def model_bytes(directory: Path) -> int:
    """Bytes of a model directory's weights as float32 (the job's dtype)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += math.prod(weights.get_slice(name).get_shape())
    return 4 * total


class Imports:
    """A Ray actor that imports a role's modules and holds nothing else."""

    def __init__(self, modules: list[str]) -> None:
        for module in modules:
            importlib.import_module(module)

    def pid(self) -> int:
        return os.getpid()


def memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / GIB, info.pss / GIB


def measure_processes() -> list[dict]:
    import ray

    from protege.actors.ray_actors import init_ray

    os.environ["RAY_ADDRESS"] = "local"
    init_ray()
    actor = ray.remote(num_cpus=0.1)(Imports)
    learner = actor.remote(LEARNER_IMPORTS)
    sampler = actor.remote(SAMPLER_IMPORTS)
    pids = {"learner": ray.get(learner.pid.remote()), "sampler": ray.get(sampler.pid.remote())}
    importlib.import_module("protege.run")  # the driver's imports
    time.sleep(2.0)  # let Ray's agents finish starting
    rows = []
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        command = " ".join(process.cmdline()) or process.name()
        role = role_of(command, process.pid == me.pid)
        if process.pid == pids["learner"]:
            role = "learner process, imports only"
        elif process.pid == pids["sampler"]:
            role = "sampler + teacher process, imports only"
        elif role == "driver":
            role = "driver (imports protege.run; no model)"
        rss, pss = memory(process.pid)
        rows.append({"part": role, "rss_gib": rss, "pss_gib": pss})
    ray.shutdown()
    return rows


def state_rows(pair: Path, teacher_dtype: str) -> list[dict]:
    from protege.modeling import load_frozen_model

    student = model_bytes(pair / "student")
    teacher = load_frozen_model(str(pair / "teacher"), teacher_dtype)  # as the job holds it
    held = sum(p.numel() * p.element_size() for p in teacher.parameters())
    return [
        {"part": "learner: fp32 weights + gradients + AdamW's two moments", "bytes": 4 * student},
        {"part": "sampler: fp32 copy of the student", "bytes": student},
        {"part": f"colocated teacher: weights (teacher.dtype={teacher_dtype})", "bytes": held},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, required=True)
    parser.add_argument("--job-json", type=Path, help="a real_model.py --workers ray result")
    parser.add_argument("--teacher-dtype", default="float32", help="teacher.dtype of the job")
    parser.add_argument("--name", default="ray_memory_floor", help="results file name")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    processes = measure_processes()
    state = [
        {**row, "rss_gib": row["bytes"] / GIB, "pss_gib": row["bytes"] / GIB}
        for row in state_rows(args.pair, args.teacher_dtype)
    ]
    rows = sorted(processes, key=lambda r: -r["rss_gib"]) + state
    floor = {key: sum(r[key] for r in rows) for key in ("rss_gib", "pss_gib")}
    result = {"rows": rows, "floor": floor, "target_gib": 3.5}
    if args.job_json:
        job = json.loads(args.job_json.read_text())
        run = job["runs"][0]
        result["job"] = {"rss_gib": run["tree_peak_rss_gib"], "pss_gib": run["tree_peak_pss_gib"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


def markdown(result: dict) -> str:
    lines = ["| part | RSS GiB | PSS GiB |", "| --- | ---: | ---: |"]
    for row in result["rows"]:
        lines.append(f"| {row['part']} | {row['rss_gib']:.3f} | {row['pss_gib']:.3f} |")
    floor = result["floor"]
    lines.append(f"| **floor (sum)** | **{floor['rss_gib']:.2f}** | **{floor['pss_gib']:.2f}** |")
    if "job" in result:
        job = result["job"]
        lines.append(f"| the measured job's peak | {job['rss_gib']:.2f} | {job['pss_gib']:.2f} |")
    lines.append(f"| the issue's target | {result['target_gib']:.2f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

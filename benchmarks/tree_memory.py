"""Peak memory of a process and every process it starts (Ray's GCS, raylet and actors).

`ru_maxrss` covers one process only; a Ray job is a tree of them. `TreeMeter` polls the
tree and keeps the peak of two sums: RSS (what the issue's budget is stated in; shared pages
such as torch's libraries count once per process, so it over-counts) and PSS (each shared
page split between the processes that map it: the memory the job really holds). At the
moment the RSS sum peaks it also keeps each process's RSS and PSS under a role name (the
driver, Ray's own servers, each actor by its protege role), so a report can say where the
memory goes.
"""

from __future__ import annotations

import threading
import time

import psutil

GIB = 2**30

# Ray's own processes, by a piece of their command line (Ray 2.60).
RAY_PROCESSES = (
    ("gcs_server", "ray: gcs_server"),
    ("raylet/raylet", "ray: raylet"),
    ("dashboard/dashboard.py", "ray: dashboard (API server, job submission)"),
    ("ray::DashboardAgent", "ray: dashboard agent"),
    ("ray::RuntimeEnvAgent", "ray: runtime-env agent"),
    ("log_monitor.py", "ray: log monitor"),
    ("autoscaler/_private/monitor.py", "ray: autoscaler monitor"),
    ("ray::IDLE", "ray: idle worker"),
)
# protege's worker classes (a Ray actor's process title is `ray::<Class>[.<method>]`).
ACTOR_ROLES = {
    "Learner": "learner",
    "HFSampler": "rollout (sampler)",
    "VLLMSampler": "rollout (vLLM sampler)",
    "ColocatedSampler": "rollout + teacher (colocated)",
    "TeacherScorer": "teacher",
    "VLLMTeacherScorer": "teacher (vLLM)",
    "ServerTeacherScorer": "teacher (server client)",
    "KVTeacherScorer": "teacher (K-V)",
    "RewardScorer": "reward",
}


def role_of(command: str, root: bool = False) -> str:
    """A readable role for a process of the tree from its command line."""
    if root:
        return "driver"
    for piece, role in RAY_PROCESSES:
        if piece in command:
            return role
    if command.startswith("ray::"):
        cls = command[len("ray::") :].split()[0].split(".")[0]
        return f"actor: {ACTOR_ROLES.get(cls, cls)}"
    return command[:60]


class TreeMeter:
    """Polls `pid` and its descendants every `interval` seconds on a daemon thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.at_peak: dict[str, float] = {}  # process -> RSS GiB when the RSS sum peaked
        self.breakdown: list[dict] = []  # per process when the RSS sum peaked
        self.own_peak: dict[int, int] = {}  # pid -> its own highest RSS seen (bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreeMeter:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        each: dict[str, float] = {}
        rows: list[dict] = []
        for process in processes:
            try:
                info = process.memory_full_info()
                command = " ".join(process.cmdline()) or process.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between the listing and the read
            own_pss = getattr(info, "pss", info.rss)
            rss += info.rss
            pss += own_pss
            each[f"{process.pid} {command[:60]}"] = round(info.rss / GIB, 3)
            role = role_of(command, process.pid == self.root.pid)
            rows.append({"pid": process.pid, "role": role, "rss": info.rss, "pss": own_pss})
            self.own_peak[process.pid] = max(self.own_peak.get(process.pid, 0), info.rss)
        if rss > self.peak_rss:
            self.at_peak, self.breakdown = each, rows
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(processes))

    def report(self) -> dict:
        breakdown = [
            {
                "pid": row["pid"],
                "role": row["role"],
                "rss_gib": round(row["rss"] / GIB, 3),
                "pss_gib": round(row["pss"] / GIB, 3),
                "own_peak_rss_gib": round(self.own_peak.get(row["pid"], 0) / GIB, 3),
            }
            for row in sorted(self.breakdown, key=lambda row: -row["rss"])
        ]
        return {
            "tree_peak_rss_gib": self.peak_rss / GIB,
            "tree_peak_pss_gib": self.peak_pss / GIB,
            "tree_processes": self.peak_processes,
            "tree_at_peak_gib": self.at_peak,
            "tree_breakdown": breakdown,
        }


def breakdown_markdown(report: dict) -> str:
    """The per-process table at the RSS peak (largest first), with the sums."""
    lines = [
        "| pid | role | RSS GiB at the peak | PSS GiB at the peak | its own peak RSS GiB |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in report["tree_breakdown"]:
        lines.append(
            f"| {row['pid']} | {row['role']} | {row['rss_gib']:.3f} | {row['pss_gib']:.3f} "
            f"| {row['own_peak_rss_gib']:.3f} |"
        )
    rss = sum(row["rss_gib"] for row in report["tree_breakdown"])
    pss = sum(row["pss_gib"] for row in report["tree_breakdown"])
    lines.append(
        f"| | **all {len(report['tree_breakdown'])} processes** | **{rss:.2f}** | **{pss:.2f}** | |"
    )
    return "\n".join(lines) + "\n"


def run_metered(command: list[str], interval: float = 0.5, **popen) -> tuple[int, str, str, dict]:
    """Run `command` to the end under a TreeMeter: (returncode, stdout, stderr, peaks)."""
    import subprocess

    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    with TreeMeter(process.pid, interval) as meter:
        out, err = process.communicate()
    report = meter.report() | {"wall_s": time.perf_counter() - started}
    return process.returncode, out, err, report

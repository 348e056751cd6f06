"""Peak memory of a process and every process it starts (Ray's GCS, raylet and actors).

`ru_maxrss` covers one process only; a Ray job is a tree of them. `TreeMeter` polls the
tree and keeps the peak of two sums: RSS (what the issue's budget is stated in; shared pages
such as torch's libraries count once per process, so it over-counts) and PSS (each shared
page split between the processes that map it: the memory the job really holds).
"""

from __future__ import annotations

import threading
import time

import psutil

GIB = 2**30


class TreeMeter:
    """Polls `pid` and its descendants every `interval` seconds on a daemon thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.at_peak: dict[str, float] = {}  # process -> RSS GiB when the RSS sum peaked
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
        for process in processes:
            try:
                info = process.memory_full_info()
                name = " ".join(process.cmdline())[:60] or process.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between the listing and the read
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            each[f"{process.pid} {name}"] = round(info.rss / GIB, 3)
        if rss > self.peak_rss:
            self.at_peak = each
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(processes))

    def report(self) -> dict[str, float]:
        return {
            "tree_peak_rss_gib": self.peak_rss / GIB,
            "tree_peak_pss_gib": self.peak_pss / GIB,
            "tree_processes": self.peak_processes,
            "tree_at_peak_gib": self.at_peak,
        }


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

"""The OSD controller: replays traffic to the server and moves records to the learner.

It owns no model (like the training controller): the server and the distiller are
workers spawned through a launcher (threads in this process, or Ray actors). Per request:
wait for its arrival time, serve it, buffer its records, then — never waiting on the
learner — load finished draft weights and start the next update when the buffer is ready.
Serving stops for one draft-weight load per update and for nothing else of the learner's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protege.osd.buffer import DistillBuffer
from protege.osd.config import OSDConfig
from protege.osd.records import Request, Served
from protege.osd.stats import ServingStats, Totals


@dataclass(frozen=True)
class Event:
    """One entry of the loop's timeline (tests read the order; the plot marks updates)."""

    kind: str  # "served", "submitted" (records to the learner), "loaded" (weights in the server)
    requests: int  # requests served when it happened
    value: int = 0  # the request's index, the records submitted, or the draft version loaded
    version: int = 0  # draft version serving after it


class OSDLoop:
    def __init__(
        self,
        config: OSDConfig,
        launcher: Any,
        server: Any,
        distiller: Any | None,
        requests: list[Request],
        log: Any,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config, self.launcher = config, launcher
        self.server, self.distiller = server, distiller
        self.requests, self.log = requests, log
        self.clock, self.sleep = clock, sleep
        buffer = config.buffer
        self.buffer = DistillBuffer(buffer.capacity, buffer.min_records, buffer.max_age_s, clock)
        self.stats = ServingStats()
        self.initial = Totals()  # the requests served before the first update landed
        self.second_half = Totals()  # the last half of the traffic (after recovery)
        self.timeline: list[Event] = []
        self.rows: list[dict[str, float]] = []
        self._pending: Any = None  # the update in flight
        self._updates = 0
        self._version = 0  # draft version the server holds
        self._last_update: dict[str, float] = {}
        self._has_heldout = False

    def run(self, heldout_prompts: list[str] | None = None) -> dict[str, float]:
        """Serve every request; returns the totals (the rows went to the log)."""
        if heldout_prompts:
            self.launcher.get(self.server.prepare_heldout.remote(heldout_prompts))
            self._has_heldout = True
        self._write_row(0)
        start = self.clock()
        for request in self.requests:
            served, latency = self._serve(request, start)
            self.stats.add(served, latency)
            if self._updates == 0:
                self.initial.add(served, latency)
            if 2 * request.index >= len(self.requests):
                self.second_half.add(served, latency)
            self.buffer.add(served.records)
            served_so_far = self.stats.total.requests
            self.timeline.append(
                Event("served", served_so_far, request.index, served.weights_version)
            )
            self._sync_draft()
            if self.stats.total.requests % self.config.eval.every == 0:
                self._write_row(self.stats.total.requests)
        if self.stats.window.requests:
            self._write_row(self.stats.total.requests)
        return self._finish()

    def _serve(self, request: Request, start: float) -> tuple[Served, float]:
        """Serve `request` at its arrival time; latency counts from arrival (queueing
        included when the server falls behind the rate), else from the call."""
        arrival = start + request.arrival
        if self.config.serving.rate > 0 and self.clock() < arrival:
            self.sleep(arrival - self.clock())
        called = self.clock()
        served = self.launcher.get(self.server.serve.remote(request))
        since = arrival if self.config.serving.rate > 0 else called
        return served, self.clock() - since

    def _sync_draft(self) -> None:
        """Load a finished update (the one pause of serving), then start the next one."""
        if self._pending is not None and self.launcher.ready(self._pending):
            result = self.launcher.get(self._pending)
            self._pending = None
            seconds = self.launcher.get(self.server.load_weights.remote(result.update))
            self._updates += 1
            self._last_update = {**result.metrics, "osd/weight_load_seconds": seconds}
            served = self.stats.total.requests
            version = self._version = result.update.version
            self.timeline.append(Event("loaded", served, version, version))
        if self._pending is None and self.distiller is not None and self.buffer.ready():
            records = self.buffer.drain()
            self._pending = self.distiller.update.remote(records)
            self.timeline.append(Event("submitted", self.stats.total.requests, records.size))

    def _write_row(self, step: int) -> None:
        row: dict[str, float] = {"step": step}
        if step > 0:
            row.update(self.stats.row())
        row["osd/buffer_size"] = float(self.buffer.size)
        row["osd/buffer_dropped"] = float(self.buffer.dropped)
        row["osd/updates"] = float(self._updates)
        row["osd/draft_version"] = float(self._version)
        row["osd/update_in_flight"] = float(self._pending is not None)
        if self._has_heldout:
            row["osd/heldout_kl"] = self.launcher.get(self.server.heldout_kl.remote())
        row.update(self._last_update)
        self.rows.append(row)
        self.log.write(row)

    def _finish(self) -> dict[str, float]:
        if self._pending is not None:  # let the last update end cleanly; it lands nowhere
            self.launcher.get(self._pending)
            self._pending = None
        totals = self.stats.total.metrics("total")
        totals.update(self.initial.metrics("initial_draft"))
        totals.update(self.second_half.metrics("second_half"))
        totals["total/updates"] = float(self._updates)
        totals["total/records_distilled"] = float(self.buffer.drained)
        if self._has_heldout:
            totals["total/heldout_kl_first"] = self.rows[0]["osd/heldout_kl"]
            totals["total/heldout_kl_last"] = self.rows[-1]["osd/heldout_kl"]
        return totals

"""Serving statistics over time: what each metrics row of an OSD run reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protege.osd.records import Served


@dataclass
class Totals:
    requests: int = 0
    tokens: int = 0
    verified: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    service_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, served: Served, latency: float) -> None:
        self.requests += 1
        self.tokens += served.tokens
        self.verified += served.verified
        self.drafted += served.drafted
        self.accepted += served.accepted
        self.rounds += served.rounds
        self.service_seconds += served.seconds
        self.latencies.append(latency)

    def metrics(self, prefix: str) -> dict[str, float]:
        """Acceptance rate α (accepted / judged draft tokens: the chance the target keeps a
        proposal it judges, Leviathan et al.'s α), draft efficiency (accepted / all draft
        tokens, counting those discarded after a rejection), mean accepted length (draft
        tokens kept per verification round), tokens per target forward, decoding speed
        (tokens per second of service time) and request latency percentiles."""
        return {
            f"{prefix}/acceptance_rate": self.accepted / max(self.verified, 1),
            f"{prefix}/draft_efficiency": self.accepted / max(self.drafted, 1),
            f"{prefix}/drafted_per_round": self.drafted / max(self.rounds, 1),
            f"{prefix}/mean_accepted_length": self.accepted / max(self.rounds, 1),
            f"{prefix}/tokens_per_round": self.tokens / max(self.rounds, 1),
            f"{prefix}/tokens_per_s": self.tokens / max(self.service_seconds, 1e-9),
            f"{prefix}/latency_p50_ms": 1e3 * percentile(self.latencies, 50),
            f"{prefix}/latency_p95_ms": 1e3 * percentile(self.latencies, 95),
            f"{prefix}/requests": float(self.requests),
        }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation); 0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


class ServingStats:
    """Totals since the start, and a window that each metrics row reports and resets."""

    def __init__(self) -> None:
        self.total = Totals()
        self.window = Totals()

    def add(self, served: Served, latency: float) -> None:
        self.total.add(served, latency)
        self.window.add(served, latency)

    def row(self) -> dict[str, float]:
        """The window's metrics (`osd/...`) and the running acceptance rate; resets the window."""
        row = self.window.metrics("osd")
        row["osd/acceptance_rate_total"] = self.total.accepted / max(self.total.verified, 1)
        self.window = Totals()
        return row

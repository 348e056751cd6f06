"""The bounded buffer of distillation records between the serving loop and the learner.

OSD (Liu et al. 2023, §4) keeps the positions where the draft was wrong, with both models'
distributions, and distils when the buffer passes a size or an age threshold; the drained
records are not reused (each update trains on fresh traffic, as in the paper's Algorithm 1).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from protege.osd.records import DistillRecords, concat_records


class DistillBuffer:
    """Records in arrival order; at most `capacity` (the oldest are dropped and counted)."""

    def __init__(
        self,
        capacity: int,
        min_records: int,
        max_age_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if capacity < 1 or min_records < 1:
            raise ValueError(
                f"capacity and min_records must be >= 1, got {capacity}, {min_records}"
            )
        self.capacity, self.min_records, self.max_age_s = capacity, min_records, max_age_s
        self._clock = clock
        self._parts: deque[tuple[float, DistillRecords]] = deque()  # (added at, records)
        self._size = 0
        self.dropped = 0  # records pushed out by the capacity bound, over the buffer's life
        self.drained = 0  # records handed to the learner

    @property
    def size(self) -> int:
        return self._size

    def add(self, records: DistillRecords | None) -> None:
        if records is None or records.size == 0:
            return
        self._parts.append((self._clock(), records))
        self._size += records.size
        while self._size > self.capacity:
            self._drop_oldest(self._size - self.capacity)

    def _drop_oldest(self, excess: int) -> None:
        added, oldest = self._parts[0]
        if oldest.size <= excess:
            self._parts.popleft()
            removed = oldest.size
        else:
            self._parts[0] = (added, oldest.last(oldest.size - excess))
            removed = excess
        self._size -= removed
        self.dropped += removed

    def age(self) -> float:
        """Seconds since the oldest record held arrived (0 when empty)."""
        return self._clock() - self._parts[0][0] if self._parts else 0.0

    def ready(self) -> bool:
        """Past the size threshold, or (with an age threshold) holding a record that old."""
        if self._size >= self.min_records:
            return True
        return self.max_age_s > 0 and self._size > 0 and self.age() >= self.max_age_s

    def drain(self) -> DistillRecords | None:
        """Every record held, oldest first, as one; the buffer is then empty."""
        if not self._parts:
            return None
        records = concat_records([part for _, part in self._parts])
        self._parts.clear()
        self._size = 0
        self.drained += records.size
        return records

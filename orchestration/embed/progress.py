"""Progress of an embedding run: samples done of planned, rate, ETA; one log line at most
every ``every_s`` seconds (rank 0 speaks for the job: ranks embed shares of similar size),
and at the end."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("sslstream.embed")


def _clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, planned: int, *, every_s: float, enabled: bool, what: str = "embedded") -> None:
        self.planned, self.every_s, self.enabled, self.what = max(0, planned), every_s, enabled, what
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        pct = f" ({100.0 * self.done / self.planned:.1f}%)" if self.planned else ""
        rate = self.rate
        eta = _clock((self.planned - self.done) / rate) if rate > 0 and self.planned else "?"
        return (f"embed: {self.what} {self.done}/{self.planned} samples{pct} on rank 0, "
                f"{rate:.0f} img/s, elapsed {_clock(elapsed)}, ETA {eta}")

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            log.info(self.line())

    def finish(self) -> None:
        if self.enabled:
            log.info(self.line())

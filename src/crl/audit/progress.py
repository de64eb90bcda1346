"""The audit's progress line: models done / total, elapsed time and an ETA over the whole audit,
then each target's attack phase (attacks done / total); `--quiet` turns it off.

On a terminal the line is rewritten in place; elsewhere (a log file, CI) a new line is written
at most every `every` seconds and at each phase change, so a log stays short. The ETA assumes
the remaining models take as long as the ones so far (attacks included: they run between
models), so it is rough early on and while cached models are served.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def clock_text(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    s = round(max(seconds, 0.0))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class AuditProgress:
    """One overall progress line for an audit of `total` models."""

    def __init__(self, total: int, *, stream: TextIO | None = None, every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.every, self.clock = total, 0, every, clock
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = clock()
        self.last = -float("inf")
        self.phase = "training"
        self.width = 0

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def line(self) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        text = (f"audit: models {self.done}/{self.total} ({pct:.0f}%), "
                f"{clock_text(self.elapsed())} elapsed")
        if 0 < self.done < self.total:
            eta = self.elapsed() / self.done * (self.total - self.done)
            text += f", ETA {clock_text(eta)}"
        return f"{text}; {self.phase}"

    def show(self, force: bool = False) -> None:
        now = self.clock()
        if not (force or self.tty or now - self.last >= self.every):
            return
        self.last, text = now, self.line()
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def model_done(self) -> None:
        self.done += 1
        self.show(force=self.done == self.total)

    def target(self, tag: str) -> None:
        """A new target (defense, seed): its models are trained next."""
        self.phase = f"{tag} training"
        self.show(force=True)

    def attack(self, tag: str, i: int, n: int, name: str) -> None:
        """Attack i (0-based) of n, `name`, starts on target `tag`."""
        self.phase = f"{tag} attacks {i}/{n} done, running {name}"
        self.show(force=i == 0)

    def close(self) -> None:
        self.phase = "done"
        self.show(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class CountingCache:
    """A model cache that tells `on_model` of every model it serves or stores: each model of an
    audit passes it once, from the cache or freshly trained."""

    def __init__(self, cache: Any, on_model: Callable[[], None]) -> None:
        self.cache, self.on_model = cache, on_model

    def get(self, key: dict[str, Any]) -> Any:
        trained = self.cache.get(key)
        if trained is not None:
            self.on_model()
        return trained

    def put(self, key: dict[str, Any], trained: Any) -> None:
        self.cache.put(key, trained)
        self.on_model()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

"""Progress of one `verify-identity` run: every phase on one (done, total) scale, and signs of life.

The caller's callback takes `(done, total)`, as every command's does. A run has several phases, each
with its own measure of work (bytes compared, models loaded, forward calls, blocks streamed); `RunProgress`
gives each phase a slice of one total in *bytes of weights processed*, so the bar moves through the whole
run in one direction: the structural check counts the bytes it compares; the transformers engine counts
each model's size once for loading it and once for each of its three passes (full forward, cached
decoding, greedy tokens), split over the forward calls of a pass; the native engine counts what it
streams, every block of both models once per pass. A phase that cannot report from inside (transformers
loading a model, one long forward call) is covered by `alive()`, which repeats the last report every
`HEARTBEAT_S` seconds from a thread, so a front end that prints a line every ~10 s keeps printing.

Invariant: reported `done` never decreases and never exceeds `total`; the callback is never called from
two threads at once.
Must not: print; import torch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum

Progress = Callable[[int, int], None]  # (done, total), the caller's callback
HEARTBEAT_S = 1.0


class Phase(StrEnum):
    STRUCTURAL = "structural check"
    LOAD_BASE = "loading the base"
    RUN_BASE = "base forward, cached decoding and greedy tokens"
    LOAD_EXPANDED = "loading the expansion"
    RUN_EXPANDED = "expansion forward, cached decoding and greedy tokens"
    LOCKSTEP = "native lockstep: forward and cached decoding"
    # compare: A's logits, then B's beside them (transformers); both block by block (native)
    LOAD_A = "loading A"
    RUN_A = "A forward"
    LOAD_B = "loading B"
    RUN_B = "B forward"
    STREAM = "native: A then B, block by block"


PhaseProgress = Callable[[Phase, int, int], None]  # (phase, done, total within the phase)


class RunProgress:
    """The phases of one run, each `(phase, size)`, mapped onto the caller's `(done, total)`."""

    def __init__(self, callback: Progress | None, phases: Sequence[tuple[Phase, int]]) -> None:
        self.callback = callback
        self.start: dict[Phase, int] = {}
        self.size: dict[Phase, int] = {}
        offset = 0
        for phase, size in phases:
            self.start[phase], self.size[phase] = offset, max(0, size)
            offset += self.size[phase]
        self.total = offset
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, phase: Phase, done: int, total: int) -> None:
        """`done` of `total` units of `phase` are finished."""
        if phase not in self.size:
            return
        fraction = min(1.0, done / total) if total > 0 else 1.0
        self._report(self.start[phase] + int(self.size[phase] * fraction))

    def of(self, phase: Phase) -> Progress:
        """A `(done, total)` callback for one phase (the structural check's, say)."""
        return lambda done, total: self(phase, done, total)

    def _report(self, done: int, *, again: bool = False) -> None:
        with self._lock:
            if done < self.done or (done == self.done and not again):
                return
            self.done = min(done, self.total)
            if self.callback is not None:
                self.callback(self.done, self.total)

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """Repeat the last report every `HEARTBEAT_S` seconds while the body runs (in a daemon thread)."""
        if self.callback is None:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                self._report(self.done, again=True)

        thread = threading.Thread(target=beat, name="llamapro-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

"""Wake-up pacing: how many waiting callers one step of the event loop may wake.

Resolving a future does not run its caller: the caller runs in the loop's *next* step. So a
reader that resolves a hundred futures in one go makes the next step run a hundred callers
(each decodes its result, validates it, builds and submits its next call), and every other
coroutine of the loop (a web request, a heartbeat) waits for all of them: that step is the
loop's lag. A :class:`Pacer` cuts such bursts into chunks: the reply reader and its command
pipe share one, and together resolve at most :attr:`Pacer.chunk` futures per step of the loop;
a producer that finds the chunk full yields to the loop (the woken callers run, the loop's
timers and I/O get their turn), then goes on.

The chunk is sized from what the woken callers cost, measured: at each pause, the CPU time
the loop's thread spent until the producer got the loop back, divided by the callers woken,
updates an average per-caller cost; the chunk is the step budget (:data:`STEP_BUDGET`) over
that cost. Thread CPU time, not wall time: a process the OS did not schedule meanwhile has
done no work, and smaller chunks would not help it.
"""

from __future__ import annotations

import asyncio
import time

#: Target CPU time of the callers woken by one chunk (seconds).
STEP_BUDGET = 0.0005
#: First guess of one woken caller's cost (seconds), until measured: on the high side, so the
#: first chunks are small rather than long.
INITIAL_COST = 100e-6
#: Bounds of a chunk.
MIN_CHUNK, MAX_CHUNK = 1, 256
#: Weight of the newest measurement in the running average.
_WEIGHT = 0.2


class Pacer:
    """Chunks of wake-ups sized to :attr:`budget` seconds of woken work (module docstring).

    Parameters:
      budget: target CPU time of one chunk's woken callers.
    """

    def __init__(self, budget: float = STEP_BUDGET) -> None:
        self.budget = budget
        #: Running average of one woken caller's CPU time (seconds).
        self.cost = INITIAL_COST
        self.chunk = self._size()
        #: Times a producer yielded between two chunks.
        self.pauses = 0
        #: Callers woken since this step of the loop began (by every producer of the pacer).
        self.woken = 0

    def _size(self) -> int:
        return max(MIN_CHUNK, min(MAX_CHUNK, int(self.budget / self.cost)))

    @property
    def full(self) -> bool:
        """Whether this step woke a chunk's worth of callers (then :meth:`pause` first)."""
        return self.woken >= self.chunk

    def wake(self) -> None:
        """Count a caller about to be woken (call it before resolving the caller's future)."""
        if not self.woken:  # the count restarts with the next step, before the woken callers
            asyncio.get_running_loop().call_soon(self._restart)
        self.woken += 1

    def _restart(self) -> None:
        self.woken = 0

    async def pause(self) -> None:
        """Yield to the loop (the callers woken so far run); learn their cost meanwhile."""
        self.pauses += 1
        woken = self.woken
        started = time.thread_time()
        await asyncio.sleep(0)  # the woken callers run in this step, before we resume
        if woken > 0:
            sample = (time.thread_time() - started) / woken
            self.cost += (sample - self.cost) * _WEIGHT
            self.chunk = self._size()

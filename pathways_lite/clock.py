"""Clocks: real (wall) time, and a virtual clock that simulates time for reproducible runs.

    rt = Runtime(islands, clock="real")                    # wall time
    rt = Runtime(islands, clock=VirtualClock(speeds={"fast": 1.0, "slow": 3.0}))
    f = rt.call(inner_phase, state, island="slow", cost=500)   # 500 units -> 1500 simulated s
    rt.now()                                                # simulated seconds

Under the virtual clock the data still computes for real; only *when* work
is considered finished follows simulated time:

- a call on island I with ``cost`` c lasts ``c * speeds.get(I, default)``
  simulated seconds (a gang lasts ``c * max`` over its islands);
- an island runs one thing at a time: a call starts at
  ``max(now, island free, inputs arrived)``;
- a transfer lasts ``link.latency_s + nbytes / link.bandwidth_bytes_per_s``
  and a link carries one transfer at a time;
- the controller itself takes no simulated time; time advances only while it
  waits (``result``, ``wait``, ``as_completed``, ``shutdown``), delivering
  events in order of (simulated time, submission sequence number).

So completion order and timestamps depend only on the program, never on the
machine. ``VirtualClock.state_dict()`` holds the current time, per-island and
per-link busy-until times and the sequence counter, for checkpoints;
``load_state_dict`` restores them (on a runtime with nothing in flight).
"""
from __future__ import annotations

import heapq
import math
import time


class RealClock:
    """Wall-clock seconds since the runtime started (plus ``start``, e.g. restored from a checkpoint)."""

    kind = "real"

    def __init__(self, start: float = 0.0):
        self._t0 = time.perf_counter() - float(start)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def state_dict(self) -> dict:
        return {"kind": "real", "now": self.now()}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "real")
        self._t0 = time.perf_counter() - float(state["now"])


class VirtualClock:
    """Simulated time: ``speeds`` maps island name -> simulated seconds per unit of cost."""

    kind = "virtual"

    def __init__(self, speeds: dict | None = None, default: float = 1.0):
        speeds = dict(speeds or {})
        for name, s in list(speeds.items()) + [("<default>", default)]:
            if not isinstance(s, (int, float)) or not (s >= 0 and math.isfinite(s)):
                raise ValueError(f"VirtualClock speed for {name!r} must be a finite number >= 0 "
                                 f"(simulated seconds per unit of cost), got {s!r}")
        self.speeds = speeds
        self.default = float(default)
        self.now = 0.0
        self.island_free: dict[str, float] = {}
        self.link_free: dict[tuple, float] = {}
        self._seq = 0
        self._heap: list = []

    # -- the schedule ---------------------------------------------------------------------------
    def speed(self, island: str) -> float:
        return self.speeds.get(island, self.default)

    def validate(self, island_names) -> None:
        unknown = sorted(set(self.speeds) - set(island_names))
        if unknown:
            raise ValueError(f"VirtualClock speeds name unknown islands {unknown}; "
                             f"the runtime's islands are {sorted(island_names)}")

    def reserve(self, islands, ready: float, cost: float) -> tuple[float, float]:
        """Book ``islands`` (names) for ``cost`` units once ``ready``; returns (start, end)."""
        free = self.island_free
        start = max(ready, self.now)
        speed = 0.0
        for name in islands:
            f = free.get(name, 0.0)
            if f > start:
                start = f
            s = self.speeds.get(name, self.default)
            if s > speed:
                speed = s
        end = start + cost * speed
        for name in islands:
            free[name] = end
        return start, end

    def reserve_link(self, key: tuple, ready: float, seconds: float) -> tuple[float, float]:
        """Book link ``key`` = (src, dst) for ``seconds`` once ``ready``; returns (start, end)."""
        start = max(ready, self.now)
        if seconds <= 0:
            return start, start
        start = max(start, self.link_free.get(key, 0.0))
        end = start + seconds
        self.link_free[key] = end
        return start, end

    # -- the event queue ------------------------------------------------------------------------
    def push(self, t: float, item) -> int:
        seq = self._seq
        self._seq = seq + 1
        heapq.heappush(self._heap, (t, seq, item))
        return seq

    def peek_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop(self):
        """Remove the earliest event, advance ``now`` to it and return ``(time, seq, item)``."""
        ev = heapq.heappop(self._heap)
        if ev[0] > self.now:
            self.now = ev[0]
        return ev

    def advance_to(self, t: float) -> None:
        if t > self.now:
            self.now = t

    def pending(self) -> list:
        """The queued events as (time, seq, item), in delivery order."""
        return sorted(self._heap, key=lambda e: (e[0], e[1]))

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": "virtual", "now": self.now, "seq": self._seq,
                "island_free": dict(self.island_free),
                "link_free": [[a, b, t] for (a, b), t in sorted(self.link_free.items())],
                "speeds": dict(self.speeds), "default": self.default}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "virtual")
        if self._heap:
            raise RuntimeError(f"VirtualClock.load_state_dict: {len(self._heap)} events still pending; "
                               "restore only into a runtime with nothing in flight")
        self.now = float(state["now"])
        self._seq = int(state["seq"])
        self.island_free = {k: float(v) for k, v in state["island_free"].items()}
        self.link_free = {(a, b): float(t) for a, b, t in state["link_free"]}
        self.speeds = dict(state.get("speeds", self.speeds))
        self.default = float(state.get("default", self.default))


def _check_kind(state, kind):
    if state.get("kind") != kind:
        raise ValueError(f"clock state is for a {state.get('kind')!r} clock, this clock is {kind!r}")


def make_clock(spec):
    """``"real"``, ``"virtual"`` or a clock object -> a clock object."""
    if spec == "real":
        return RealClock()
    if spec == "virtual":
        return VirtualClock()
    if isinstance(spec, (RealClock, VirtualClock)):
        return spec
    raise ValueError(f"clock must be 'real', 'virtual', a RealClock or a VirtualClock, got {spec!r}")

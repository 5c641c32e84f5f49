"""What the two controllers share: ``Runtime`` (local islands) and ``RayRuntime`` (Ray actors).

Both take the same arguments and fail the same way, so their checks are
written here once. A shut-down runtime raises at once; anything else wrong with
a call, transfer or gang (an unknown island, a ``fn`` that is not callable, a
bad ``cost``, ``wire_dtype`` or ``spec``, an argument that is no array, number
or Future, a failed input or a Future of another runtime) fails the Future it
returns. :class:`Controller` also holds the public API that is the same for
both: ``transfer``, ``island``, ``now``, ``state_dict`` / ``load_state_dict``
and the context manager.

A subclass names itself in its messages (``_NAME``, ``_REMEDY``), makes
Futures of ``_future_cls`` and provides ``islands``, ``clock``, ``_engine``,
``_closed``, ``_lookup(island)`` (None if unknown), ``_check_spec(isl, spec)``,
``_start_transfer``, ``pending`` and ``shutdown``.
"""
from __future__ import annotations

import math

from pathways_lite import network
from pathways_lite.clock import make_clock
from pathways_lite.futures import Future
from pathways_lite.network import LinkModel


class _Failed(Exception):
    """An input failed: the dependant fails with ``exc``, the original exception."""

    def __init__(self, exc):
        self.exc = exc


def _fn_name(fn):
    return getattr(fn, "__name__", None) or type(fn).__name__


def _check(fn, cost, what, label):
    """Validated cost (default 1 unit of work) of a ``what`` ("call" or "gang") of ``fn``."""
    if not callable(fn):
        raise TypeError(f"{what}: fn must be callable, got {fn!r}")
    if cost is None:
        return 1.0
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not (cost >= 0 and math.isfinite(cost)):
        raise ValueError(f"{what} {label!r}: cost must be a finite number >= 0 (units of work), got {cost!r}")
    return float(cost)


def _check_leaf(x, island):
    """Raise TypeError for an argument leaf that cannot be placed on ``island`` (a name)."""
    if isinstance(x, (str, bytes)) or x is None or callable(x):
        raise TypeError(f"argument leaf {x!r} of type {type(x).__name__} cannot be placed on island "
                        f"{island!r}; pass arrays, numbers or Futures (bind static values with "
                        "functools.partial)")


def _island_list(islands):
    """A gang's ``islands``: a list or tuple as given, another iterable as a list."""
    t = type(islands)
    if t is list or t is tuple:
        return islands
    if isinstance(islands, str) or not hasattr(islands, "__iter__"):
        raise TypeError(f"gang: islands must be a list of island names, got {islands!r}")
    return list(islands)


class Controller:
    """The API and argument checks shared by Runtime and RayRuntime (see the module docstring)."""

    _NAME = "Runtime"               # how messages name the class
    _REMEDY = "make a new Runtime"  # what to do once it is shut down
    _future_cls = Future

    def _setup(self, names, clock, links):
        """The clock made from ``clock``, once the island ``names``, the clock and ``links`` are
        checked; sets ``virtual`` and ``links`` (a LinkModel; None: the default links)."""
        if len(set(names)) != len(names):
            raise ValueError(f"{self._NAME}: island names must be distinct, got {names}")
        clock = make_clock(clock)
        self.virtual = clock.kind == "virtual"
        if self.virtual:
            clock.validate(names)
        if links is None:
            links = LinkModel()
        if not isinstance(links, LinkModel):
            raise TypeError(f"{self._NAME}: links must be a LinkModel or None, got {type(links).__name__}")
        links.validate(names)
        self.links = links
        return clock

    # -- public API ----------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def now(self) -> float:
        """Current time of the runtime's clock (simulated seconds under the virtual clock)."""
        return self._engine.now()

    def island(self, name):
        """The island ``name`` (ValueError naming this runtime's islands if there is none)."""
        isl = self._lookup(name)
        if isl is None:
            raise ValueError(self._unknown(name))
        return isl

    def transfer(self, x, *, island, wire_dtype=None, spec=None, name=None) -> Future:
        """``x`` (Future, array or host value) on ``island`` through the link; returns a Future."""
        isl, fut = self._new_future("transfer", island, name or "transfer", "transfer")
        if isl is None:
            return fut
        try:
            wire = network.canonical_wire_dtype(wire_dtype)
            if spec is not None:
                self._check_spec(isl, spec)
            if isinstance(x, Future):
                self._check_future(x)
                if x._exc is not None:
                    raise _Failed(x._exc)
                self._start_transfer(fut, x, None, x.island, isl, wire, spec)
            else:
                self._start_transfer(fut, None, x, self._holder(x), isl, wire, spec)
        except _Failed as f:
            self._engine.fail_now(fut, f.exc)
        except Exception as e:
            self._engine.fail_now(fut, e)
        return fut

    def state_dict(self) -> dict:
        """Clock time, per-island/link busy-until, link byte counters and what is in flight."""
        return {"clock": self.clock.state_dict(), "links": self.links.state_dict(), "pending": self.pending()}

    def load_state_dict(self, state: dict) -> None:
        """Restore clock and link counters (into a runtime with nothing in flight)."""
        self.clock.load_state_dict(state["clock"])
        self.links.load_state_dict(state["links"])

    # -- checks --------------------------------------------------------------------------------
    def _check_open(self, what):
        if self._closed:
            raise RuntimeError(f"{self._NAME}.{what}: the runtime is shut down; {self._REMEDY}")

    def _new_future(self, what, island, label, kind="call"):
        """(the island, the new Future of a ``what`` on it); an unknown island fails that Future
        and comes back as None."""
        self._check_open(what)
        isl = self._lookup(island)
        fut = self._future_cls(self, isl.name if isl is not None else str(island), label, kind)
        fut._t_enq = self._engine.now()
        if isl is None:
            self._engine.fail_now(fut, ValueError(self._unknown(island)))
        return isl, fut

    def _unknown(self, island):
        return f"unknown island {island!r}; this runtime's islands are {[i.name for i in self.islands]}"

    def _check_future(self, a):
        if a._rt is self:
            return
        if a._rt._closed:
            raise ValueError(f"Future {a.name!r} belongs to a Runtime that was shut down; "
                             "pass its result() (arrays) to this runtime instead")
        raise ValueError(f"Future {a.name!r} belongs to another Runtime; futures work only "
                         "within the runtime that made them (pass its result() instead)")

    def _holder(self, x):
        """Where a non-Future value to transfer comes from: "host" (see Runtime's)."""
        return "host"

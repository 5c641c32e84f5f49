"""The runtime's timeline: spans of work per island, transfers between islands.

    rt = Runtime(islands, trace=True)
    ...
    rt.trace.write("trace.json")      # open in https://ui.perfetto.dev or chrome://tracing
    rt.trace.plot("trace.png")        # Gantt chart: one row per island, transfers as arrows
    rt.trace.utilization("island0")   # busy fraction of the traced window
    rt.trace.intervals("island0", key)  # {group: (start, end)} of its calls grouped by key(span)
    rt.trace.events()                 # [Event(kind, name, island, t, fid, nbytes, peer, status)]

Every piece of work is recorded once, when it finishes, as a :class:`Span`
(enqueue, start and end time on the runtime's clock). :meth:`Trace.events`
flattens spans into ``enqueue`` / ``start`` / ``end`` events (calls and gangs)
and ``transfer_start`` / ``transfer_end`` events (transfers; ``peer`` is the
source island). Under the real clock ``end`` is when the runtime saw the
outputs ready and ``start`` is the earliest time the island could have
begun: max(enqueued, the island's previous end, the inputs' ends); work
shorter than the completion threads' batching window (``RealEngine.batch_s``,
0.5 ms) gets its observed end, an upper bound. Under the
virtual clock all times are the simulated schedule, so two runs of one
program give identical events.
"""
from __future__ import annotations

import json
import threading
from typing import NamedTuple


class Span(NamedTuple):
    kind: str        # "call" | "gang" | "transfer"
    name: str
    island: str      # where it ran (a transfer: the destination)
    t_enq: float
    t_start: float
    t_end: float
    fid: int         # the future's id
    nbytes: int = 0  # bytes sent (transfers)
    peer: str = ""   # transfer source island ("host" for host values); gang: its global sequence number
    status: str = "ok"   # "ok" | "error" | "cancelled"


class Event(NamedTuple):
    kind: str
    name: str
    island: str
    t: float
    fid: int
    nbytes: int
    peer: str
    status: str


class Trace:
    """Thread-safe list of spans with exporters. ``islands`` fixes the row order."""

    def __init__(self, islands=()):
        self.islands = list(islands)
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def add(self, span: Span) -> None:
        self.spans.append(span)  # list.append is atomic

    def clear(self) -> None:
        with self._lock:
            self.spans = []

    def events(self) -> list[Event]:
        """All events, ordered by (time, order of recording)."""
        out = []
        for sp in list(self.spans):
            if sp.kind == "transfer":
                kinds = (("transfer_start", sp.t_start), ("transfer_end", sp.t_end))
            else:
                kinds = (("enqueue", sp.t_enq), ("start", sp.t_start), ("end", sp.t_end))
            for kind, t in kinds:
                out.append(Event(kind, sp.name, sp.island, t, sp.fid, sp.nbytes, sp.peer, sp.status))
        order = {"enqueue": 0, "transfer_start": 1, "start": 1, "transfer_end": 2, "end": 2}
        return sorted(out, key=lambda e: (e.t, order[e.kind], e.fid))

    def window(self) -> tuple[float, float]:
        spans = [s for s in self.spans if s.kind != "transfer"] or list(self.spans)
        if not spans:
            return (0.0, 0.0)
        return min(s.t_start for s in spans), max(s.t_end for s in spans)

    def busy(self, island: str, t0: float | None = None, t1: float | None = None) -> float:
        """Seconds ``island`` computed (union of its call/gang spans) inside [t0, t1]."""
        w0, w1 = self.window()
        t0 = w0 if t0 is None else t0
        t1 = w1 if t1 is None else t1
        ivs = sorted((max(s.t_start, t0), min(s.t_end, t1)) for s in self.spans
                     if s.island == island and s.kind != "transfer" and s.status != "cancelled")
        total, cur_s, cur_e = 0.0, None, None
        for s, e in ivs:
            if e <= s:
                continue
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def intervals(self, island: str, key) -> dict:
        """``island``'s finished compute grouped by ``key``: {group: (first start, last end)},
        in group order.

        Calls and gangs with status "ok" count, transfers do not. ``key(span)`` names a span's
        group (hashable and sortable; None leaves the span out) and is called once per such
        span, in recording order (so it may count them). A group's spans make one interval
        whether they overlap, touch or leave gaps (e.g. an outer step's phase: its restart,
        inner steps and delta); ``busy`` is the time actually spent computing."""
        iv = {}
        for s in list(self.spans):
            if s.island != island or s.kind == "transfer" or s.status != "ok":
                continue
            k = key(s)
            if k is None:
                continue
            a, b = iv.get(k, (s.t_start, s.t_end))
            iv[k] = (min(a, s.t_start), max(b, s.t_end))
        return dict(sorted(iv.items()))

    def utilization(self, island: str, t0: float | None = None, t1: float | None = None) -> float:
        """Busy fraction of ``island`` in [t0, t1] (default: first start to last end of the trace)."""
        w0, w1 = self.window()
        t0 = w0 if t0 is None else t0
        t1 = w1 if t1 is None else t1
        return self.busy(island, t0, t1) / (t1 - t0) if t1 > t0 else 0.0

    # -- exporters ---------------------------------------------------------------------------
    def _rows(self):
        rows = list(self.islands)
        for s in self.spans:
            if s.island not in rows:
                rows.append(s.island)
        return {name: i for i, name in enumerate(rows)}

    def chrome_trace(self) -> dict:
        """The trace as a Chrome/Perfetto ``{"traceEvents": [...]}`` dict (times in microseconds)."""
        rows = self._rows()
        ev = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "pathways_lite"}}]
        for name, tid in rows.items():
            ev.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": name}})
            ev.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": tid, "args": {"sort_index": tid}})
        link_rows = {}
        for sp in sorted(self.spans, key=lambda s: (s.t_start, s.fid)):
            args = {"fid": sp.fid, "status": sp.status, "enqueued_us": sp.t_enq * 1e6}
            if sp.kind == "transfer":
                key = f"{sp.peer}->{sp.island}"
                tid = link_rows.setdefault(key, len(rows) + len(link_rows))
                args.update(bytes=sp.nbytes, src=sp.peer, dst=sp.island)
                ev.append({"ph": "X", "name": sp.name, "cat": "transfer", "pid": 0, "tid": tid,
                           "ts": sp.t_start * 1e6, "dur": (sp.t_end - sp.t_start) * 1e6, "args": args})
                if sp.peer in rows:
                    ev.append({"ph": "s", "id": sp.fid, "name": "transfer", "cat": "transfer", "pid": 0,
                               "tid": rows[sp.peer], "ts": sp.t_start * 1e6})
                    ev.append({"ph": "f", "bp": "e", "id": sp.fid, "name": "transfer", "cat": "transfer",
                               "pid": 0, "tid": rows[sp.island], "ts": sp.t_end * 1e6})
            else:
                if sp.kind == "gang":
                    args["gang_seq"] = sp.peer
                ev.append({"ph": "X", "name": sp.name, "cat": sp.kind, "pid": 0, "tid": rows[sp.island],
                           "ts": sp.t_start * 1e6, "dur": (sp.t_end - sp.t_start) * 1e6, "args": args})
        for key, tid in link_rows.items():
            ev.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": f"link {key}"}})
        return {"traceEvents": ev, "displayTimeUnit": "ms"}

    def write(self, path) -> str:
        """Write the Chrome/Perfetto trace JSON to ``path``; returns the path."""
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)
        return str(path)

    def plot(self, path, title: str | None = None) -> str:
        """Write a Gantt PNG: one row per island, work as bars, transfers as arrows between rows."""
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = self._rows()
        fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * max(1, len(rows))))
        colors = {"call": "tab:blue", "gang": "tab:purple"}
        for sp in self.spans:
            if sp.kind == "transfer":
                continue
            y = rows[sp.island]
            color = "tab:red" if sp.status == "error" else colors[sp.kind]
            ax.barh(y, max(sp.t_end - sp.t_start, 0.0), left=sp.t_start, height=0.6, color=color,
                    edgecolor="black", linewidth=0.3)
        for sp in self.spans:
            if sp.kind == "transfer" and sp.peer in rows and sp.peer != sp.island:
                y0, y1 = rows[sp.peer], rows[sp.island]
                ax.annotate("", xy=(sp.t_end, y1 - 0.3 * (1 if y1 > y0 else -1)),
                            xytext=(sp.t_start, y0 + 0.3 * (1 if y1 > y0 else -1)),
                            arrowprops=dict(arrowstyle="->", color="tab:orange", lw=0.8))
        ax.set_yticks(list(rows.values()))
        ax.set_yticklabels([f"{n} ({100 * self.utilization(n):.0f}%)" for n in rows])
        ax.invert_yaxis()
        ax.set_xlabel("time (s)")
        ax.set_title(title or "pathways_lite timeline (bars: work; arrows: transfers; % = utilization)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)

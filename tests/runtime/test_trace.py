"""Trace: events, Chrome/Perfetto JSON, PNG Gantt chart, utilization."""
import itertools
import json

import numpy as np
import pytest

from pathways_lite.clock import VirtualClock
from pathways_lite.islands import make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.runtime import Runtime
from pathways_lite.trace import Span, Trace
from tests.runtime.conftest import add1, times3


@pytest.fixture
def virtual_run(devices):
    isls = make_islands(2, devices=devices, names=["a", "b"])
    links = LinkModel(default=Link(bandwidth_bytes_per_s=400.0, latency_s=0.0))
    with Runtime(isls, clock=VirtualClock({"a": 1.0, "b": 1.0}), links=links) as rt:
        f = rt.call(add1, np.zeros(100, np.float32), island="a", cost=2, name="f")   # a: [0, 2]
        g = rt.call(times3, f, island="b", cost=1, name="g")    # link: [2, 3]; b: [3, 4]
        h = rt.call(add1, f, island="a", cost=1, name="h")      # a: [2, 3]
        bad = rt.call(lambda x: x @ np.ones((3, 3)), f, island="a", name="bad")
        g.result(), h.result(), bad.exception()
        yield rt


def test_events_order_and_content(virtual_run):
    ev = virtual_run.trace.events()
    assert [e.t for e in ev] == sorted(e.t for e in ev)
    by = {}
    for e in ev:
        by.setdefault((e.name, e.kind), e)
    assert by[("f", "enqueue")].t == 0.0 and by[("f", "start")].t == 0.0 and by[("f", "end")].t == 2.0
    assert by[("g", "start")].t == 3.0 and by[("g", "end")].t == 4.0 and by[("g", "end")].island == "b"
    tr = by[("f->b", "transfer_start")]
    assert (tr.t, tr.peer, tr.island, tr.nbytes) == (2.0, "a", "b", 400)
    assert by[("f->b", "transfer_end")].t == 3.0
    assert by[("bad", "end")].status == "error"
    # per future: enqueue <= start <= end
    for fid in {e.fid for e in ev if e.kind == "start"}:
        kinds = [e.kind for e in ev if e.fid == fid]
        assert kinds == ["enqueue", "start", "end"]


def test_utilization_from_events(virtual_run):
    tr = virtual_run.trace
    assert tr.window() == (0.0, 4.0)
    assert tr.busy("a") == 3.0 and tr.utilization("a") == pytest.approx(3.0 / 4.0)
    assert tr.utilization("b") == pytest.approx(1.0 / 4.0)
    assert tr.utilization("b", 3.0, 4.0) == 1.0


def test_chrome_trace_json_is_valid(virtual_run, tmp_path):
    path = virtual_run.trace.write(tmp_path / "trace.json")
    data = json.loads(open(path).read())
    events = data["traceEvents"]
    assert isinstance(events, list) and events
    for e in events:
        assert {"ph", "name", "pid", "tid"} <= set(e), e
        if e["ph"] == "X":
            assert isinstance(e["ts"], float) and e["dur"] >= 0
        if e["ph"] in ("s", "f"):
            assert "id" in e and "ts" in e
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"a", "b", "link a->b"} <= names
    xs = [e for e in events if e["ph"] == "X" and e["name"] == "g"]
    assert len(xs) == 1 and xs[0]["ts"] == 3.0e6 and xs[0]["dur"] == 1.0e6
    flows = [e["ph"] for e in events if e["ph"] in ("s", "f")]
    assert sorted(flows) == ["f", "s"]


def test_png_is_written(virtual_run, tmp_path):
    path = virtual_run.trace.plot(tmp_path / "trace.png")
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"


def test_real_clock_trace_has_consistent_spans(rt4):
    fs = [rt4.call(add1, np.float32(i), island=f"island{i % 4}") for i in range(8)]
    last = rt4.call(add1, fs[0], island="island1")
    last.result(timeout=60)
    rt4.shutdown()
    spans = [s for s in rt4.trace.spans if s.kind == "call"]
    assert len(spans) == 9
    for s in spans:
        assert s.t_enq <= s.t_start <= s.t_end
    for isl in ("island0", "island1"):
        assert 0.0 < rt4.trace.utilization(isl) <= 1.0


def test_intervals_merge_the_spans_of_each_group():
    """{group: (first start, last end)}: overlapping, touching and disjoint spans of a group
    make one interval each; transfers, other islands, failed spans and key None are left out."""
    tr = Trace(["x", "y"])
    spans = [("call", "a", "x", 0.0, 2.0, "ok"), ("call", "a", "x", 1.0, 3.0, "ok"),   # overlap
             ("gang", "b", "x", 5.0, 6.0, "ok"), ("call", "b", "x", 4.0, 5.0, "ok"),   # touch
             ("call", "c", "x", 7.0, 8.0, "ok"), ("call", "c", "x", 10.0, 11.0, "ok"),  # gap
             ("transfer", "a", "x", -1.0, 9.0, "ok"), ("call", "a", "y", -2.0, 0.5, "ok"),
             ("call", "c", "x", 6.0, 12.0, "error"), ("call", "skip", "x", 0.0, 20.0, "ok")]
    for i, (kind, name, isl, s, e, status) in enumerate(spans):
        tr.add(Span(kind, name, isl, s, s, e, i, status=status))
    iv = tr.intervals("x", lambda sp: None if sp.name == "skip" else sp.name)
    assert iv == {"a": (0.0, 3.0), "b": (4.0, 6.0), "c": (7.0, 11.0)}
    assert list(iv) == ["a", "b", "c"]
    assert tr.intervals("y", lambda sp: sp.name) == {"a": (-2.0, 0.5)}
    assert tr.intervals("z", lambda sp: sp.name) == {}
    n = itertools.count(1)   # key is called once per counted span, in recording order
    iv = tr.intervals("x", lambda sp: next(n) if sp.name in ("a", "b") else None)
    assert iv == {1: (0.0, 2.0), 2: (1.0, 3.0), 3: (5.0, 6.0), 4: (4.0, 5.0)}


def test_busy_merges_overlaps():
    tr = Trace(["x"])
    for i, (s, e) in enumerate([(0, 2), (1, 3), (5, 6)]):
        tr.add(Span("call", "n", "x", s, s, e, i))
    assert tr.busy("x") == 4.0 and tr.utilization("x") == pytest.approx(4.0 / 6.0)
    assert Trace().utilization("nobody") == 0.0

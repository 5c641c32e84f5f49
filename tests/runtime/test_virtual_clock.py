"""The virtual clock: simulated schedule, deterministic order, timeouts, cancel, checkpoint state."""
import jax
import numpy as np
import pytest

from pathways_lite.clock import RealClock, VirtualClock
from pathways_lite.futures import CancelledError, as_completed, wait
from pathways_lite.islands import make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.runtime import Runtime
from tests.runtime.conftest import add, add1, mat, times3

SPEEDS = {"a": 1.0, "b": 2.0}
LINK = Link(bandwidth_bytes_per_s=1000.0, latency_s=0.5)


def scenario(devices):
    """Runs a small program; returns (completion order, times, now, normalized events)."""
    isls = make_islands(2, devices=devices, names=["a", "b"])
    rt = Runtime(isls, clock=VirtualClock(SPEEDS), links=LinkModel(default=LINK))
    f1 = rt.call(add1, np.zeros(100, np.float32), island="a", cost=2, name="f1")  # a: [0, 2]
    f2 = rt.call(add1, np.zeros(3, np.float32), island="b", cost=1, name="f2")    # b: [0, 2]
    f3 = rt.call(times3, f1, island="b", cost=1, name="f3")   # link [2, 2.9]; b: [2.9, 4.9]
    f4 = rt.call(add, f1, f1, island="a", cost=1, name="f4")  # a: [2, 3]
    order = [f.name for f in as_completed([f3, f4, f2, f1])]
    times = {f.name: f.times for f in (f1, f2, f3, f4)}
    np.testing.assert_array_equal(f3.result(), np.full(100, 3.0))
    np.testing.assert_array_equal(f4.result(), np.full(100, 2.0))
    now = rt.now()
    fids = {}
    events = [(e.kind, e.name, e.island, e.t, fids.setdefault(e.fid, len(fids)), e.nbytes, e.peer, e.status)
              for e in rt.trace.events()]
    rt.shutdown()
    return order, times, now, events


def test_schedule_matches_hand_computation(devices):
    order, times, now, events = scenario(devices)
    assert order == ["f1", "f2", "f4", "f3"]            # f1 and f2 tie at t=2: submission order
    assert times["f1"] == (0.0, 0.0, 2.0)
    assert times["f2"] == (0.0, 0.0, 2.0)
    assert times["f3"] == pytest.approx((0.0, 2.9, 4.9))  # 0.5 s latency + 400 B / 1000 B/s
    assert times["f4"] == (0.0, 2.0, 3.0)
    assert now == pytest.approx(4.9)
    transfer = [e for e in events if e[0] == "transfer_start"]
    assert len(transfer) == 1 and transfer[0][2:4] == ("b", 2.0) and transfer[0][5] == 400


def test_two_runs_give_identical_event_logs(devices):
    assert scenario(devices) == scenario(devices)


def test_completion_order_ignores_real_compute_time(devices):
    def slow(x):
        return jax.lax.fori_loop(0, 100, lambda i, a: mat(a) / 64.0, x)

    isls = make_islands(2, devices=devices, names=["a", "b"])
    with Runtime(isls, clock=VirtualClock({"a": 0.001, "b": 1.0})) as rt:
        heavy = rt.call(slow, np.ones((64, 64), np.float32), island="a", cost=1)   # slow for real
        light = rt.call(add1, np.float32(1), island="b", cost=1)                   # slow in simulation
        assert list(as_completed([light, heavy])) == [heavy, light]
        done, not_done = wait([light, heavy], return_when="FIRST_COMPLETED")
        assert done == {heavy, light}


def test_timeouts_are_simulated_seconds(devices):
    isls = make_islands(2, devices=devices, names=["a", "b"])
    with Runtime(isls, clock=VirtualClock(SPEEDS)) as rt:
        f = rt.call(add1, np.float32(0), island="b", cost=5)     # ends at 10
        done, not_done = wait([f], timeout=4.0)
        assert not done and rt.now() == 4.0
        with pytest.raises(TimeoutError):
            f.result(timeout=1.0)
        assert rt.now() == 5.0 and not f.done()
        assert float(f.result()) == 1.0 and rt.now() == 10.0


def test_cancel_before_simulated_start(devices):
    isls = make_islands(2, devices=devices, names=["a", "b"])
    with Runtime(isls, clock=VirtualClock(SPEEDS)) as rt:
        first = rt.call(add1, np.float32(0), island="a", cost=3)    # a: [0, 3]
        queued = rt.call(add1, np.float32(0), island="a", cost=1)   # a: [3, 4]
        dep = rt.call(times3, queued, island="b")
        assert not first.cancel()                                   # started at t=0
        assert queued.cancel() and queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result()
        assert isinstance(dep.exception(), CancelledError)
        assert float(first.result()) == 1.0


def test_callbacks_submit_work_at_the_delivery_time(devices):
    isls = make_islands(2, devices=devices, names=["a", "b"])
    with Runtime(isls, clock=VirtualClock(SPEEDS)) as rt:
        follow = []
        f = rt.call(add1, np.float32(0), island="a", cost=2)
        f.add_done_callback(lambda fut: follow.append(rt.call(add1, fut, island="a", cost=1)))
        f.result()
        assert len(follow) == 1 and follow[0].times[:2] == (2.0, 2.0)
        assert float(follow[0].result()) == 2.0 and rt.now() == 3.0


def test_state_dict_round_trip(devices):
    isls = make_islands(2, devices=devices, names=["a", "b"])
    with Runtime(isls, clock=VirtualClock(SPEEDS), links=LinkModel(default=LINK)) as rt:
        f = rt.call(add1, np.zeros(10, np.float32), island="a", cost=2)
        g = rt.call(add1, f, island="b", cost=1)
        pending = rt.pending()
        assert [(p["name"], p["t_end"]) for p in pending] == [("add1", 2.0), ("add1->b", 2.54), ("add1", 4.54)]
        g.result()
        state = rt.state_dict()
    assert state["clock"]["now"] == pytest.approx(4.54) and state["pending"] == []
    with Runtime(isls, clock=VirtualClock(SPEEDS), links=LinkModel(default=LINK)) as rt2:
        rt2.load_state_dict(state)
        assert rt2.now() == pytest.approx(4.54) and rt2.links.bytes_sent("a", "b") == 40
        h = rt2.call(add1, np.float32(0), island="b", cost=1)
        assert h.times[1:] == pytest.approx((4.54, 6.54))
    with pytest.raises(ValueError, match="'virtual' clock"):
        RealClock().load_state_dict(state["clock"])


def test_bad_speeds(devices):
    isls = make_islands(2, devices=devices, names=["a", "b"])
    with pytest.raises(ValueError, match="unknown islands"):
        Runtime(isls, clock=VirtualClock({"c": 1.0}))
    with pytest.raises(ValueError, match="finite number"):
        VirtualClock({"a": -1.0})

"""Future / wait / as_completed semantics (concurrent.futures-shaped)."""
import threading

import numpy as np
import pytest

from pathways_lite.clock import VirtualClock
from pathways_lite.futures import (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, CancelledError,
                                   Future, as_completed, wait)
from pathways_lite.runtime import Runtime
from tests.runtime.conftest import add1, slow_link_runtime, times3


def boom(x):
    raise FloatingPointError("boom in tracing")


def test_result_done_and_callbacks(rt4):
    seen = []
    f = rt4.call(add1, np.float32(1), island="island0")
    f.add_done_callback(lambda fut: seen.append(("cb1", fut)))
    f.add_done_callback(lambda fut: 1 / 0)       # a failing callback is logged, not fatal
    f.add_done_callback(lambda fut: seen.append(("cb3", fut)))
    assert float(f.result(timeout=30)) == 2.0
    wait([f])
    assert f.done() and not f.running() and not f.cancelled() and f.exception() is None
    # callbacks run in order, exactly once, with the future; late callbacks run at once
    deadline = threading.Event()
    while len(seen) < 2 and not deadline.wait(0.01):
        pass
    assert seen == [("cb1", f), ("cb3", f)]
    f.add_done_callback(lambda fut: seen.append(("late", fut)))
    assert seen[-1] == ("late", f)
    with pytest.raises(TypeError, match="callable"):
        f.add_done_callback(3)


def test_result_timeout_then_success(islands4):
    with slow_link_runtime(islands4, latency=0.4) as rt:
        a = rt.call(add1, np.float32(1), island="island0")
        b = rt.call(times3, a, island="island1")      # waits on the slow link
        with pytest.raises(TimeoutError, match="not done"):
            b.result(timeout=0.01)
        assert not b.done()
        assert float(b.result(timeout=30)) == 6.0


def test_cancel_only_queued_work(islands4):
    with slow_link_runtime(islands4, latency=0.4) as rt:
        a = rt.call(add1, np.float32(1), island="island0")
        b = rt.call(times3, a, island="island1")      # queued behind the link
        c = rt.call(add1, b, island="island1")        # depends on the cancelled one
        d = rt.call(add1, a, island="island2")        # independent of b
        assert b.cancel() and b.cancelled() and b.done() and b.cancel()
        with pytest.raises(CancelledError):
            b.result()
        assert isinstance(c.exception(timeout=30), CancelledError)
        assert float(d.result(timeout=30)) == 3.0
        assert not a.cancel() and not d.cancel()        # running/finished work is not cancelled
        assert rt.call(add1, a, island="island1").result(timeout=30) == 3.0


def test_wait_modes(islands4):
    with slow_link_runtime(islands4, latency=0.5) as rt:
        fast = rt.call(add1, np.float32(1), island="island0")
        slow = rt.call(times3, fast, island="island1")
        bad = rt.call(boom, np.float32(1), island="island2")
        done, not_done = wait([fast, slow], return_when=FIRST_COMPLETED, timeout=30)
        assert fast in done and slow in not_done
        done, not_done = wait([slow, bad], return_when=FIRST_EXCEPTION, timeout=30)
        assert done == {bad} and not_done == {slow}
        done, not_done = wait([slow], timeout=0.01)
        assert not done and not_done == {slow}
        done, not_done = wait([fast, slow, bad], return_when=ALL_COMPLETED, timeout=30)
        assert done == {fast, slow, bad} and not not_done
        assert wait([]) == (set(), set())


def test_as_completed_order_follows_completion():
    # Virtual clock: completion order is the simulated order, deterministic.
    from pathways_lite.islands import make_islands
    isls = make_islands(3)
    with Runtime(isls, clock=VirtualClock(speeds={"island0": 3.0, "island1": 1.0, "island2": 2.0})) as rt:
        fs = [rt.call(add1, np.float32(i), island=f"island{i}") for i in range(3)]
        assert [f.island for f in as_completed(fs)] == ["island1", "island2", "island0"]
        # already finished futures come first, in finishing order
        g = rt.call(add1, np.float32(0), island="island0")
        assert list(as_completed([g, fs[0], fs[1]]))[:2] == [fs[1], fs[0]]


def test_as_completed_real_clock_and_timeout(islands4):
    with slow_link_runtime(islands4, latency=0.4) as rt:
        a = rt.call(add1, np.float32(1), island="island0")
        slow = rt.call(times3, a, island="island1")
        fast = rt.call(times3, a, island="island0")
        it = as_completed([slow, fast], timeout=0.05)
        assert next(it) is fast
        with pytest.raises(TimeoutError):
            next(it)
        assert [f for f in as_completed([slow, fast], timeout=30)] == [fast, slow]


def test_wait_input_errors(rt4, islands4):
    f = rt4.call(add1, np.float32(1), island="island0")
    with pytest.raises(ValueError, match="return_when"):
        wait([f], return_when="SOMETIMES")
    with pytest.raises(TypeError, match="Futures"):
        wait([f, 3])
    with Runtime(islands4) as other:
        g = other.call(add1, np.float32(1), island="island0")
        with pytest.raises(ValueError, match="one Runtime"):
            wait([f, g])


def test_users_do_not_construct_futures_but_repr_is_informative(rt4):
    f = rt4.call(boom, np.float32(1), island="island3", name="my_step")
    assert isinstance(f, Future)
    assert "my_step" in repr(f) and "island3" in repr(f) and "FloatingPointError" in repr(f)

"""The dispatch fast paths: inline calls, batched completion, offload to island threads."""
import threading

import jax
import numpy as np
import pytest

from pathways_lite import dispatch
from pathways_lite.futures import CancelledError, as_completed, wait
from pathways_lite.islands import make_islands
from pathways_lite.runtime import Runtime
from tests.runtime.conftest import add, add1, slow_link_runtime, times3


def bad_pure_callback(x):
    def host(v):
        raise ArithmeticError("boom on the device")
    return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1


def _islands(devices, n=2):
    return make_islands(n, devices=devices, devices_per_island=1)


def test_fast_path_chain_values_callbacks_and_trace(devices):
    with Runtime(_islands(devices)) as rt:
        x = jax.device_put(np.float32(0), rt.island("island0").replicated())
        rt.call(add1, x, island="island0").result()          # warm: later calls take the fast path
        assert (add1, "island0") in rt._fast
        seen = []
        fs = [rt.call(add1, x, island="island0")]
        for _ in range(200):
            fs.append(rt.call(add1, fs[-1], island="island0"))
        for f in fs[::17]:
            f.add_done_callback(seen.append)
        done = list(as_completed(fs[::-1]))
        assert float(fs[-1].result()) == 201.0
        assert [f._done_seq for f in done] == sorted(f._done_seq for f in done)
        # every future finished after its input, once; callbacks ran once each
        assert all(b._done_seq > a._done_seq for a, b in zip(fs, fs[1:]))
        assert sorted(id(f) for f in seen) == sorted(id(f) for f in fs[::17])
        spans = [s for s in rt.trace.spans if s.fid in {f._id for f in fs}]
        assert len(spans) == len(fs) and all(s.t_end >= s.t_start >= s.t_enq for s in spans)


def test_fast_path_errors_fail_exactly_the_dependants(devices):
    with Runtime(_islands(devices)) as rt:
        x = jax.device_put(np.float32(1), rt.island("island1").replicated())
        for fn in (bad_pure_callback, add1, times3):   # seen once: the next calls are fast-path ones
            rt.call(fn, x, island="island1").exception()
        ok = rt.call(add1, x, island="island1")
        bad = rt.call(bad_pure_callback, ok, island="island1")
        dep = rt.call(add1, bad, island="island1")
        dep2 = rt.call(add1, dep, island="island0")          # across islands too
        indep = rt.call(times3, ok, island="island1")
        wait([bad, dep, dep2, indep], timeout=60)
        exc = bad.exception()
        assert "boom on the device" in str(exc)
        assert dep.exception() is exc and dep2.exception() is exc
        assert float(indep.result()) == 6.0 and float(ok.result()) == 2.0
        assert not dep.cancel()     # dispatched work cannot be cancelled


def test_deep_deferred_chain_is_enqueued_without_recursion(devices):
    # 3000 calls wait (deferred) on a transfer over a slow link; when it lands, each dispatch
    # publishes its value to the next one (no waiting for completion, no deep recursion)
    with slow_link_runtime(_islands(devices), latency=0.2) as rt:
        a = rt.call(add1, np.float32(0), island="island0")
        f = rt.transfer(a, island="island1")
        for _ in range(3000):
            f = rt.call(add1, f, island="island1")
        assert float(f.result(timeout=120)) == 3001.0


@pytest.fixture
def eager_offload(monkeypatch):
    monkeypatch.setattr(dispatch, "SLOW_S", 0.0)            # every dispatch counts as blocking
    monkeypatch.setattr(dispatch, "FAST_IN_A_ROW", 10 ** 9)


def test_blocking_dispatch_moves_to_island_threads(devices, eager_offload):
    with Runtime(_islands(devices)) as rt:
        xs = [jax.device_put(np.float32(i), rt.island(f"island{i}").replicated()) for i in range(2)]
        for _ in range(dispatch.SLOW_IN_A_ROW + 1):
            fs = [rt.call(add1, x, island=f"island{i}") for i, x in enumerate(xs)]
            wait(fs)
        assert set(rt._policy.offloaded) == {(add1, "island0"), (add1, "island1")}
        assert {d.island for d in rt._policy.dispatchers.values()} == {"island0", "island1"}
        # chains that cross islands stay correct and are enqueued at once
        a, b = xs
        for _ in range(20):
            a, b = rt.call(add1, b, island="island0"), rt.call(add, a, b, island="island1")
        ra, rb = float(a.result(timeout=60)), float(b.result(timeout=60))
        fa, fb = 0.0, 1.0
        for _ in range(20):
            fa, fb = fb + 1, fa + fb
        assert (ra, rb) == (fa, fb)
        # errors: the failure and exactly its dependants
        bad = rt.call(bad_pure_callback, xs[0], island="island0")
        dep = rt.call(add1, bad, island="island1")
        indep = rt.call(add1, xs[1], island="island1")
        wait([bad, dep, indep], timeout=60)
        assert dep.exception() is bad.exception() is not None
        assert float(indep.result()) == 2.0


def test_offloaded_call_is_cancellable_until_dispatched(devices, eager_offload):
    gate = threading.Event()

    def held(x):        # traced on the island's dispatch thread: holds that thread until gate
        gate.wait(30)
        return x * 2

    with Runtime(_islands(devices)) as rt:
        x = jax.device_put(np.float32(1), rt.island("island0").replicated())
        gate.set()
        for _ in range(dispatch.SLOW_IN_A_ROW + 1):
            rt.call(held, x, island="island0").result(timeout=60)
        assert (held, "island0") in rt._policy.offloaded
        gate.clear()
        first = rt.call(held, np.ones(3, np.float32), island="island0")   # new shape: traces, waits
        queued = rt.call(held, x, island="island0")
        dep = rt.call(add1, queued, island="island1")
        assert not queued.done() and queued.cancel() and queued.cancelled()
        gate.set()
        np.testing.assert_allclose(first.result(timeout=60), 2.0)
        assert isinstance(dep.exception(timeout=60), CancelledError)
        assert float(rt.call(held, x, island="island0").result(timeout=60)) == 2.0


def test_dispatch_mode_is_validated_and_virtual_clock_never_offloads(devices):
    with pytest.raises(ValueError, match="dispatch"):
        Runtime(_islands(devices), dispatch="threads")
    with Runtime(_islands(devices), dispatch="inline") as rt:
        assert rt._policy is None
    with Runtime(_islands(devices), clock="virtual") as rt:
        assert rt._policy is None

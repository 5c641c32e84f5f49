"""Gang-scheduled computations spanning several islands."""
import threading

import jax
import numpy as np
import pytest

from pathways_lite.futures import CancelledError, wait
from pathways_lite.islands import GANG_AXIS, make_islands
from pathways_lite.runtime import Runtime
from tests.runtime.conftest import add1, slow_link_runtime


def allreduce_add(x):
    return jax.lax.psum(x, GANG_AXIS) + 1.0


def allreduce_pair(x, y):
    return {"sum": jax.lax.psum(x * y, GANG_AXIS), "mine": x - y}


@pytest.mark.parametrize("virtual", [False, True])
def test_gang_allreduce_equals_numpy(devices, virtual):
    isls = (make_islands(4, devices=devices[:1], virtual=True) if virtual
            else make_islands(4, devices=devices))
    names = [i.name for i in isls]
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(5).astype(np.float32) for _ in names]
    with Runtime(isls) as rt:
        on = [rt.call(add1, x, island=n) for x, n in zip(xs, names)]
        outs = rt.gang(allreduce_add, on, islands=names)
        assert len(outs) == 4 and [f.island for f in outs] == names
        want = sum(x + 1 for x in xs) + 1
        for f, isl in zip(outs, isls):
            got = f.result(timeout=60)
            np.testing.assert_allclose(got, want, rtol=1e-5)
            assert got.shape == (5,) and got.sharding.device_set == set(isl.devices)
        # chained gangs feed each other without leaving the union; a broadcast arg is shared
        y = outs
        for _ in range(3):
            y = rt.gang(allreduce_pair, y, 2.0, islands=names)
            y = [rt.call(lambda d: d["sum"] + d["mine"], f, island=n) for f, n in zip(y, names)]
        ref = [np.asarray(want)] * 4
        for _ in range(3):
            s = sum(r * 2.0 for r in ref)
            ref = [s + r - 2.0 for r in ref]
        for f, r in zip(y, ref):
            np.testing.assert_allclose(f.result(timeout=60), r, rtol=1e-5)


def test_chained_scalar_gangs_match_numpy(devices):
    isls = make_islands(2, devices=devices, devices_per_island=1)
    names = [i.name for i in isls]
    with Runtime(isls) as rt:
        fs = rt.gang(allreduce_add, [1.0, 2.0], islands=names)
        for _ in range(20):
            fs = rt.gang(allreduce_add, fs, islands=names)
        v = np.float32(1.0), np.float32(2.0)
        for _ in range(21):
            s = v[0] + v[1] + np.float32(1)
            v = (s, s)
        assert [float(f.result(timeout=60)) for f in fs] == [float(v[0])] * 2


def test_overlapping_gangs_from_threads_do_not_deadlock(rt4):
    groups = [("island0", "island1"), ("island1", "island2"), ("island2", "island3"), ("island3", "island0")]
    results, errors = {}, []

    def worker(k, group):
        try:
            fs = rt4.gang(allreduce_add, [float(k), 1.0], islands=list(group))
            for _ in range(8):
                fs = rt4.gang(allreduce_add, fs, islands=list(group))
            results[k] = [float(f.result(timeout=120)) for f in fs]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k, g)) for k, g in enumerate(groups)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and not any(t.is_alive() for t in threads)
    for k in range(len(groups)):
        v = np.float32(k) + np.float32(1) + np.float32(1)
        for _ in range(8):
            v = v + v + np.float32(1)
        assert results[k] == [float(v)] * 2
    seqs = sorted(int(s.peer) for s in rt4.trace.spans if s.kind == "gang" and s.island == "island0")
    assert len(seqs) == 2 * 9 and len(set(seqs)) == len(seqs)


def test_gangs_dispatch_in_one_global_order(islands4):
    with slow_link_runtime(islands4, latency=0.3) as rt:
        a = rt.call(add1, np.float32(1), island="island0")
        late = rt.gang(allreduce_add, [a, a], islands=["island1", "island2"])   # waits on the link
        after = rt.gang(allreduce_add, [1.0, 2.0], islands=["island2", "island3"])
        assert not any(f.done() or f.running() for f in after)   # queued behind the earlier gang
        wait(late + after, timeout=60)
        assert [float(f.result()) for f in late] == [5.0, 5.0]
        assert [float(f.result()) for f in after] == [4.0, 4.0]
        assert int(late[0]._src) < int(after[0]._src)
        # cancelling a queued gang cancels all of its parts
        b = rt.call(add1, np.float32(1), island="island0")
        g = rt.gang(allreduce_add, [b, 1.0], islands=["island1", "island3"])
        assert g[0].cancel()
        assert isinstance(g[1].exception(timeout=60), CancelledError)


def test_gang_errors(rt4, devices):
    names = ["island0", "island1"]
    bad_shape = rt4.gang(allreduce_add, [np.ones(2), np.ones(3)], islands=names)
    assert all("one shape" in str(f.exception(timeout=60)) for f in bad_shape)
    unknown = rt4.gang(allreduce_add, [1.0, 2.0], islands=["island0", "mars"])
    assert all("unknown island 'mars'" in str(f.exception()) for f in unknown)
    with pytest.raises(TypeError, match="list of island names"):
        rt4.gang(allreduce_add, 1.0, islands="island0")

    def raises(x):
        raise KeyError("in gang tracing")

    traced = rt4.gang(raises, [1.0, 2.0], islands=names)
    assert traced[0].exception() is traced[1].exception() and isinstance(traced[0].exception(), KeyError)
    failed_in = rt4.call(raises, 1.0, island="island0")
    dep = rt4.gang(allreduce_add, [failed_in, 1.0], islands=names)
    assert all(f.exception(timeout=60) is failed_in.exception() for f in dep)
    ok = rt4.gang(allreduce_add, [1.0, 2.0], islands=names)
    assert [float(f.result(timeout=60)) for f in ok] == [4.0, 4.0]
    mixed = make_islands(1, devices=devices[1:3], names=["shifted"])
    with Runtime(rt4.islands[:1] + tuple(mixed)) as rt:
        part = rt.gang(allreduce_add, [1.0, 2.0], islands=["island0", "shifted"])
        assert "overlapping partly" in str(part[0].exception())

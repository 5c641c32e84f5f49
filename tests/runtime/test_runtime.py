"""Runtime.call / transfer: results, placement, asynchronous dispatch, errors, bad input."""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pathways_lite.futures import as_completed, wait
from pathways_lite.islands import make_islands
from pathways_lite.runtime import Runtime
from tests.runtime.conftest import add, add1, mat, slow_link_runtime, times3


def tree_fn(params, x, scale):
    return {"y": params["w"] @ x * scale, "n": jnp.sum(params["b"]) + scale}


def test_call_results_equal_direct_jax(rt4, islands4):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3), dtype=np.float32), "b": np.arange(5, dtype=np.float32)}
    x = rng.standard_normal((3,), dtype=np.float32)
    f = rt4.call(tree_fn, params, x, 2.0, island="island2")
    want = jax.jit(tree_fn)(params, x, 2.0)
    got = f.result(timeout=60)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
    np.testing.assert_allclose(got["n"], want["n"], rtol=1e-6)
    for leaf in jax.tree_util.tree_leaves(got):
        assert leaf.sharding.device_set == set(islands4[2].devices)


def test_sharded_inputs_stay_sharded(rt4, islands4):
    isl = islands4[1]
    x = jax.device_put(np.arange(8.0, dtype=np.float32), isl.sharding(P("data")))
    y = rt4.call(add1, x, island="island1").result(timeout=60)
    assert y.sharding.device_set == set(isl.devices)
    np.testing.assert_array_equal(y, np.arange(8.0) + 1)
    # moved to another island, the PartitionSpec is kept on the destination's mesh
    z = rt4.call(add1, x, island="island3").result(timeout=60)
    assert z.sharding.device_set == set(islands4[3].devices)
    assert [s.data.shape for s in z.addressable_shards] == [(4,), (4,)]


def test_cross_island_future_args_are_transferred(rt4, islands4):
    a = rt4.call(add1, np.ones(16, np.float32), island="island0")
    b = rt4.call(add, a, a, island="island3")   # one transfer serves both uses
    out = b.result(timeout=60)
    assert out.sharding.device_set == set(islands4[3].devices)
    np.testing.assert_array_equal(out, np.full(16, 4.0))
    assert rt4.links.bytes_sent("island0", "island3") == 16 * 4
    assert rt4.links.stats()["island0->island3"]["transfers"] == 1
    t = rt4.transfer(a, island="island1", spec=P("data"))
    assert t.result(timeout=60).sharding.spec == P("data")


def test_array_of_another_island_behind_a_slow_link_moves_once(islands4):
    with slow_link_runtime(islands4, latency=0.1) as rt:
        x = rt.call(add1, np.ones(8, np.float32), island="island0").result(timeout=60)  # raw array
        f = rt.call(add, x, x, island="island1")         # waits on the link, then resumes
        np.testing.assert_array_equal(f.result(timeout=60), np.full(8, 4.0))
        assert rt.links.stats()["island0->island1"] == {"bytes": 32, "transfers": 1}


def test_result_finishes_ancestors_first(rt4):
    a = rt4.call(add1, np.float32(0), island="island0")
    b = rt4.call(times3, a, island="island1")
    c = rt4.call(add, a, b, island="island2")
    assert float(c.result(timeout=60)) == 4.0
    assert a.done() and b.done()
    assert list(as_completed([c, b, a])) == [a, b, c]   # finishing order respects dependencies


def test_chained_dispatch_runs_ahead(rt4):
    def slow(x):
        return jax.lax.fori_loop(0, 300, lambda i, a: mat(a) / 256.0, x)

    x = np.full((256, 256), 1.0 / 256, np.float32)
    rt4.call(slow, x, island="island0").result(timeout=120)   # compile everything once
    warm = [rt4.call(times3, rt4.call(add1, x, island=f"island{i}"), island="island0") for i in range(4)]
    wait(warm, timeout=60)

    t0 = time.perf_counter()
    head = rt4.call(slow, x, island="island0")
    chain = [head]
    for i in range(1, 4):
        chain.append(rt4.call(add1, chain[-1], island=f"island{i}"))
    chain.append(rt4.call(times3, chain[-1], island="island0"))
    t_dispatch = time.perf_counter() - t0
    head_done_at_return = head.done()
    states = [f.done() for f in chain]
    out = chain[-1].result(timeout=120)
    t_total = time.perf_counter() - t0
    assert not head_done_at_return and not any(states), (t_dispatch, t_total)
    assert t_dispatch < t_total
    want = np.asarray(jax.jit(slow)(x))
    np.testing.assert_allclose(out, (want + 3) * 3, rtol=1e-5)


def boom(x):
    raise FloatingPointError("boom in tracing")


def bad_callback(x):
    def host(v):
        raise ArithmeticError("boom on the device")
    return jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1


@pytest.mark.parametrize("failing", [boom, bad_callback])
def test_errors_fail_exactly_the_dependants(devices, failing):
    # One device per island: on CPU a host callback that raises inside a multi-device
    # computation leaves XLA's other participants waiting in a rendezvous (process abort).
    with Runtime(make_islands(4, devices=devices, devices_per_island=1)) as rt4:
        _check_errors(rt4, failing)


def _check_errors(rt4, failing):
    ok = rt4.call(add1, np.float32(1), island="island0")
    bad = rt4.call(failing, ok, island="island1")
    dep1 = rt4.call(add1, bad, island="island2")
    dep2 = rt4.call(add, ok, dep1, island="island3")
    indep = rt4.call(times3, ok, island="island2")
    wait([bad, dep1, dep2, indep], timeout=60)
    exc = bad.exception()
    assert exc is not None
    if failing is boom:
        assert isinstance(exc, FloatingPointError) and "tracing" in str(exc)
    else:
        assert "boom on the device" in str(exc)
    assert dep1.exception() is exc and dep2.exception() is exc
    with pytest.raises(type(exc)):
        dep2.result()
    assert ok.exception() is None and float(indep.result()) == 6.0
    # the runtime stays usable, on every island
    assert [float(rt4.call(add1, ok, island=f"island{i}").result(timeout=60)) for i in range(4)] == [3.0] * 4


def test_bad_input_is_carried_by_the_future(rt4, islands4):
    f = rt4.call(add1, np.float32(1), island="nowhere")
    with pytest.raises(ValueError, match=r"unknown island 'nowhere'.*island0"):
        f.result()
    assert isinstance(rt4.call(add1, 1.0, island=["island0"]).exception(), ValueError)
    assert "cost" in str(rt4.call(add1, 1.0, island="island0", cost=-1).exception())
    assert "cost" in str(rt4.call(add1, 1.0, island="island0", cost=True).exception())   # as RayRuntime
    assert "callable" in str(rt4.call(3, 1.0, island="island0").exception())
    assert "functools.partial" in str(rt4.call(add, 1.0, "x", island="island0").exception())
    shape = rt4.call(add, np.ones(3), np.ones(4), island="island0").exception()
    assert isinstance(shape, (TypeError, ValueError)) and "(3,)" in str(shape)
    spec = rt4.transfer(np.ones(3, np.float32), island="island1", spec=P("data")).exception()
    assert spec is not None and "3" in str(spec)
    axis = rt4.transfer(np.ones(4, np.float32), island="island1", spec=P("model")).exception()
    assert "axes are" in str(axis)
    assert "wire_dtype" in str(rt4.transfer(np.ones(2), island="island1", wire_dtype="int3").exception())
    # still fine afterwards
    assert float(rt4.call(add1, 1.0, island="island0").result(timeout=60)) == 2.0


def test_device_oom_on_transfer_fails_that_future(rt4, monkeypatch):
    a = rt4.call(add1, np.ones(1000, np.float32), island="island0")
    a.result(timeout=60)
    real_put = jax.device_put
    oom = RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate 4000 bytes")

    def fake_put(x, device=None, *args, **kw):
        if getattr(device, "device_set", None) == set(rt4.island("island2").devices):
            raise oom
        return real_put(x, device, *args, **kw)

    monkeypatch.setattr(jax, "device_put", fake_put)
    b = rt4.call(add1, a, island="island2")
    c = rt4.call(add1, b, island="island3")
    d = rt4.call(add1, a, island="island1")
    assert b.exception(timeout=60) is oom and c.exception(timeout=60) is oom
    assert d.exception(timeout=60) is None
    monkeypatch.undo()
    np.testing.assert_array_equal(rt4.call(add1, a, island="island2").result(timeout=60), np.full(1000, 3.0))


def test_shutdown_semantics(islands4):
    rt = Runtime(islands4)
    f = rt.call(add1, np.float32(1), island="island0")
    rt.shutdown()
    assert f.done() and float(f.result()) == 2.0
    with pytest.raises(RuntimeError, match="shut down"):
        rt.call(add1, 1.0, island="island0")
    rt.shutdown()  # idempotent
    with Runtime(islands4) as rt2:
        g = rt2.call(add1, f, island="island1")
        assert "shut down" in str(g.exception(timeout=60))
        h = rt2.call(add1, f.result(), island="island1")   # its arrays are fine
        assert float(h.result(timeout=60)) == 3.0


def test_compiles_once_per_fn_island_and_shape(rt4):
    traces = []

    def counted(x):
        traces.append(x.shape)
        return x * 2

    fs = [rt4.call(counted, np.ones(3, np.float32), island="island0") for _ in range(3)]
    fs.append(rt4.call(counted, np.ones(5, np.float32), island="island0"))
    wait(fs, timeout=60)
    assert traces == [(3,), (5,)]


def test_zero_arg_and_partial_calls_land_on_the_island(rt4, islands4):
    z = rt4.call(lambda: jnp.arange(3.0), island="island2").result(timeout=60)
    assert z.sharding.device_set == set(islands4[2].devices)
    p = rt4.call(functools.partial(jnp.full, (2,)), 7.0, island="island1").result(timeout=60)
    np.testing.assert_array_equal(p, [7.0, 7.0])
    assert p.sharding.device_set == set(islands4[1].devices)


def test_runtime_constructor_rejects_bad_input(islands4):
    with pytest.raises(ValueError, match="non-empty list of Islands"):
        Runtime([])
    with pytest.raises(ValueError, match="clock must be"):
        Runtime(islands4, clock="sundial")
    with pytest.raises(TypeError, match="LinkModel"):
        Runtime(islands4, links={"a": 1})

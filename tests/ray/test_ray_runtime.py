"""RayRuntime: the local Runtime's API and values, with islands in Ray actors (real processes)."""
import functools
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pathways_lite import network
from pathways_lite.clock import VirtualClock
from pathways_lite.futures import FIRST_COMPLETED, Future, as_completed, wait
from pathways_lite.islands import make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.ray_islands import RayIsland, RayRuntime
from pathways_lite.runtime import Runtime
from tests.ray import fns

SLOW = Link(bandwidth_bytes_per_s=10e6, latency_s=0.3)    # only between a and c


@pytest.fixture(scope="module")
def rt(ray_cluster):
    isls = [RayIsland("a", num_cpus=0.5, devices=2), RayIsland("b", num_cpus=0.5, devices=2),
            RayIsland("c", num_cpus=0.5)]
    r = RayRuntime(isls, links=LinkModel(links={("a", "c"): SLOW}))
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def local(devices):
    with Runtime(make_islands(2, devices=devices, devices_per_island=2, names=["a", "b"])) as r:
        yield r


def program(r):
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    a = r.call(fns.add1, x, island="a")
    b = r.call(fns.times3, a, island="b")          # a -> b through the object store
    c = r.call(fns.add, a, b, island="a")          # and back
    d = r.call(fns.mat, c, island="b")
    e = r.call(fns.make_zeros, island="a")         # no inputs: placed on the island
    return [np.asarray(f.result(timeout=120)) for f in (a, b, c, d, e)]


def test_chain_across_islands_equals_local_runtime(rt, local):
    got, want = program(rt), program(local)
    for g, w in zip(got, want):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, w)
    assert rt.links.bytes_sent("a", "b") >= 64 and rt.links.bytes_sent("b", "a") >= 64


def test_dispatch_never_waits_on_the_data_plane(rt):
    t0 = time.perf_counter()
    s = rt.call(functools.partial(fns.sleep_then, seconds=1.5), np.float32(1), island="a")
    x = rt.call(fns.add1, s, island="b")
    y = rt.call(fns.times3, x, island="a")
    z = rt.call(fns.add, y, s, island="b")
    enqueue = time.perf_counter() - t0
    assert enqueue < 1.0 and not s.done() and not z.done()
    assert float(z.result(timeout=60)) == (1 + 1) * 3 + 1
    assert time.perf_counter() - t0 >= 1.5
    assert s.times[2] <= x.times[1] + 1e-3 and x.times[2] <= y.times[1] + 1e-3


def test_failure_fails_dependants_with_the_same_exception(rt):
    f = rt.call(fns.boom, np.ones(3, np.float32), island="a")          # fails on the island
    g = rt.call(fns.add1, f, island="b")                                 # depends across islands
    h = rt.call(fns.add, g, np.float32(1), island="a")
    e = f.exception(timeout=60)
    assert isinstance(e, Exception) and "boom from the island" in str(e)
    assert g.exception(timeout=60) is e and h.exception(timeout=60) is e
    with pytest.raises(type(e)):
        h.result()
    t = rt.call(fns.bad_shapes, np.ones(3, np.float32), island="b")   # fails while tracing
    assert isinstance(t.exception(timeout=60), TypeError)
    ok = rt.call(fns.add1, np.float32(41), island="a")                 # still usable
    assert float(ok.result(timeout=60)) == 42.0


@pytest.mark.parametrize("wire", ["bf16", "int8", "int8_block", "fp8", "int4"])
def test_wire_formats_bitwise_equal_local(rt, local, wire):
    x = np.random.default_rng(3).standard_normal((33, 7)).astype(np.float32)
    outs = []
    for r in (rt, local):
        src = r.transfer(x, island="a")
        before = r.links.bytes_sent("a", "b")
        got = r.transfer(src, island="b", wire_dtype=wire).result(timeout=60)
        outs.append(np.asarray(got))
        assert r.links.bytes_sent("a", "b") - before == network.payload_nbytes(x.shape, x.dtype, wire)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - x).max() < 0.7   # quantized, not garbage


def test_sharding_spec_is_kept_or_given(rt):
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    t = rt.transfer(x, island="a", spec=P("data"))
    u = rt.transfer(t, island="b")
    np.testing.assert_array_equal(u.result(timeout=60), x)
    with pytest.raises(ValueError, match="mesh axes"):
        rt.transfer(x, island="a", spec=P("model")).result()


def test_link_delay_and_one_transfer_at_a_time(rt):
    x = rt.call(fns.add1, np.zeros(250_000, np.float32), island="a")   # 1 MB
    x.result(timeout=60)
    t0 = rt.now()
    t1 = rt.transfer(x, island="c")
    t2 = rt.transfer(x, island="c")
    assert rt.now() - t0 < 0.25                                         # never waits here
    wait([t1, t2], timeout=60)
    one = 0.3 + 1e6 / 10e6
    assert t1.times[2] - t0 >= one - 0.02
    assert t2.times[2] - t0 >= 2 * one - 0.02                           # queued behind t1
    assert t1.result().shape == (250_000,) and float(t2.result()[0]) == 1.0
    spans = [s for s in rt.trace.spans if s.kind == "transfer" and s.fid in (t1._id, t2._id)]
    assert len(spans) == 2 and all(s.nbytes == 1_000_000 and s.peer == "a" for s in spans)


def test_gang_collectives_equal_numpy(rt):
    names = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(5).astype(np.float32) for _ in names]
    on = [rt.call(fns.add1, x, island=n) for x, n in zip(xs, names)]
    outs = rt.gang(fns.allreduce_add, on, islands=names)
    assert [f.island for f in outs] == names and all(f.kind == "gang" for f in outs)
    want = sum(x + 1 for x in xs) + 1
    for f in outs:
        np.testing.assert_allclose(f.result(timeout=60), want, rtol=1e-5)
    y = rt.gang(fns.allreduce_pair, outs, 2.0, islands=names)     # a broadcast argument
    s = 3 * want * 2.0
    for f in y:
        got = f.result(timeout=60)
        np.testing.assert_allclose(got["sum"], s, rtol=1e-5)
        np.testing.assert_allclose(got["mine"], want - 2.0, rtol=1e-5)


def test_wait_and_as_completed_follow_completion(rt):
    slow = rt.call(functools.partial(fns.sleep_then, seconds=1.0), np.float32(0), island="a")
    fast = rt.call(fns.add1, np.float32(0), island="b")
    done, not_done = wait([slow, fast], timeout=60, return_when=FIRST_COMPLETED)
    assert fast in done and slow in not_done
    assert list(as_completed([slow, fast], timeout=60)) == [fast, slow]
    assert isinstance(slow, Future)


def test_functions_ship_and_compile_once_per_shape(rt, ray_cluster):
    actor = rt._st["b"].actor
    before = ray_cluster.get(actor.stats.remote())
    fs = [rt.call(fns.times3, np.full(6, i, np.float32), island="b") for i in range(5)]
    fs.append(rt.call(fns.times3, np.ones((2, 3), np.float32), island="b"))
    assert [float(f.result(timeout=60).ravel()[0]) for f in fs] == [0, 3, 6, 9, 12, 3]
    after = ray_cluster.get(actor.stats.remote())
    assert after["functions"] - before["functions"] <= 1
    assert after["compiled"] - before["compiled"] <= 2     # one per input shape (maybe 0: cached)
    big = rt.call(fns.add1, np.zeros(100_000, np.float32), island="b")   # not inlined: fetched
    np.testing.assert_array_equal(big.result(timeout=60), np.ones(100_000, np.float32))


def test_bad_input_raises_naming_the_field(rt):
    with pytest.raises(ValueError, match=r"unknown island 'zz'.*\['a', 'b', 'c'\]"):
        rt.call(fns.add1, 1.0, island="zz").result()
    with pytest.raises(ValueError, match="cost must be a finite number"):
        rt.call(fns.add1, 1.0, island="a", cost=-1).result()
    with pytest.raises(TypeError, match="cannot be placed on island"):
        rt.call(fns.add1, "text", island="a").result()
    with pytest.raises(ValueError, match="unknown wire_dtype"):
        rt.transfer(1.0, island="a", wire_dtype="int3").result()
    with pytest.raises(ValueError, match="islands must be distinct"):
        rt.gang(fns.allreduce_add, [1.0, 2.0], islands=["a", "a"])[0].result()
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        RayIsland("")
    with pytest.raises(ValueError, match="devices must be an int >= 1"):
        RayIsland("x", devices=0)


# -- the virtual clock: the same simulated schedule as the local runtime -----------------------
SPEEDS = {"a": 1.0, "b": 2.0}
LINK = Link(bandwidth_bytes_per_s=1000.0, latency_s=0.5)


def scenario(r):
    f1 = r.call(fns.add1, np.zeros(100, np.float32), island="a", cost=2, name="f1")
    f2 = r.call(fns.add1, np.zeros(3, np.float32), island="b", cost=1, name="f2")
    f3 = r.call(fns.times3, f1, island="b", cost=1, name="f3")
    f4 = r.call(fns.add, f1, f1, island="a", cost=1, name="f4")
    order = [f.name for f in as_completed([f3, f4, f2, f1])]
    vals = [np.asarray(f.result()) for f in (f1, f2, f3, f4)]
    fids = {}
    events = [(e.kind, e.name, e.island, e.t, fids.setdefault(e.fid, len(fids)), e.nbytes, e.peer, e.status)
              for e in r.trace.events() if not e.kind.startswith("island_")]
    return order, [f.times for f in (f1, f2, f3, f4)], r.now(), events, vals, r.links.stats()


def test_virtual_clock_schedule_equals_local(ray_cluster, devices):
    with Runtime(make_islands(2, devices=devices, names=["a", "b"]), clock=VirtualClock(SPEEDS),
                 links=LinkModel(default=LINK)) as lr:
        want = scenario(lr)
    isls = [RayIsland("a", num_cpus=0.5), RayIsland("b", num_cpus=0.5)]
    with RayRuntime(isls, clock=VirtualClock(SPEEDS), links=LinkModel(default=LINK)) as rr:
        got = scenario(rr)
    assert got[0] == want[0] == ["f1", "f2", "f4", "f3"]
    assert got[1] == want[1] and got[2] == want[2] == pytest.approx(4.9)
    assert got[3] == want[3]
    for g, w in zip(got[4], want[4]):
        np.testing.assert_array_equal(g, w)
    assert got[5] == want[5]


def test_two_process_island_runs_one_spmd_program(ray_cluster):
    """What one machine allows of a multi-host island: two actors of one island join through
    jax.distributed; the island's mesh spans both processes' devices and one program (sent to
    both, SPMD) reduces across them."""
    import socket
    from pathways_lite.ray_actor import IslandActor
    from pathways_lite.ray_islands import _repo_pythonpath
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"env_vars": RayIsland("m", devices=2).actor_env(_repo_pythonpath())}
    cls = ray_cluster.remote(IslandActor)
    actors = [cls.options(num_cpus=0.5, runtime_env=env, max_restarts=0).remote(
        "m", 4, ("data",), None, {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                                  "process_id": i}) for i in range(2)]
    try:
        infos = ray_cluster.get([a.info.remote() for a in actors], timeout=120)
        assert [len(i["devices"]) for i in infos] == [4, 4] and infos[0]["pid"] != infos[1]["pid"]
        fn_ref = [ray_cluster.put(fns.cross_process_sum)]
        x = np.arange(8, dtype=np.float32)
        metas = ray_cluster.get([a.call.remote((1, 1, fn_ref, (x,), False, 1 << 16)) for a in actors],
                                timeout=120)
        assert [float(m["value"]) for m in metas] == [28.0, 28.0]
    finally:
        for a in actors:
            ray_cluster.kill(a)


def test_values_are_freed_on_the_island_when_futures_are_dropped(rt, ray_cluster):
    import gc
    actor = rt._st["b"].actor
    fs = [rt.call(fns.add1, np.float32(i), island="b") for i in range(300)]
    wait(fs, timeout=120)
    held = ray_cluster.get(actor.stats.remote())["values"]
    assert held >= 300
    del fs
    gc.collect()
    last = rt.call(fns.add1, np.float32(0), island="b")   # sends the frees (batched)
    assert float(last.result(timeout=60)) == 1.0
    assert ray_cluster.get(actor.stats.remote())["values"] <= held - 250

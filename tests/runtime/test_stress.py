"""Random DAGs over random islands with injected failures and cancellations, vs sequential numpy."""
import functools

import jax
import ml_dtypes
import numpy as np
import pytest

from pathways_lite.clock import VirtualClock
from pathways_lite.futures import CancelledError, wait
from pathways_lite.islands import GANG_AXIS, make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.runtime import Runtime


def scale(x):
    return x * 0.5 + 1.0


def add(x, y):
    return x + y


def fail(node, x):
    raise ValueError(f"injected failure at node {node}")


def gang_sum(x):
    return jax.lax.psum(x, GANG_AXIS)


def make_dag(seed, names, n_nodes=36):
    """Nodes: (op, input node ids, island names, extra). Gangs produce one node per island."""
    rng = np.random.default_rng(seed)
    nodes = []
    for i in range(n_nodes):
        isl = names[rng.integers(len(names))]
        if i < 3 or rng.random() < 0.1:
            nodes.append(("const", (), (isl,), rng.integers(-4, 5, size=4).astype(np.float32)))
            continue
        pick = lambda: int(rng.integers(len(nodes)))   # noqa: E731
        r = rng.random()
        if r < 0.3:
            nodes.append(("scale", (pick(),), (isl,), None))
        elif r < 0.55:
            nodes.append(("add", (pick(), pick()), (isl,), None))
        elif r < 0.62:
            nodes.append(("fail", (pick(),), (isl,), None))
        elif r < 0.72:
            nodes.append(("bf16", (pick(),), (isl,), None))
        else:
            pair = tuple(str(n) for n in rng.choice(names, size=2, replace=False))
            ins = (pick(), pick())
            nodes.append(("gang", ins, pair, 0))
            nodes.append(("gang", ins, pair, 1))
    return nodes


def submit(rt, nodes, rng):
    futs = []
    for i, (op, ins, isls, extra) in enumerate(nodes):
        args = [futs[j] for j in ins]
        if op == "const":
            futs.append(rt.transfer(extra, island=isls[0]))
        elif op == "scale":
            futs.append(rt.call(scale, *args, island=isls[0], cost=float(rng.integers(1, 4))))
        elif op == "add":
            futs.append(rt.call(add, *args, island=isls[0]))
        elif op == "fail":
            futs.append(rt.call(functools.partial(fail, i), *args, island=isls[0]))
        elif op == "bf16":
            futs.append(rt.transfer(args[0], island=isls[0], wire_dtype="bf16"))
        elif extra == 0:
            futs.extend(rt.gang(gang_sum, list(args), islands=list(isls), cost=2.0))
    return futs


def reference(nodes, cancelled):
    """Values, or the set of root failures (node ids) a node's error must come from."""
    vals = []
    for i, (op, ins, isls, extra) in enumerate(nodes):
        failed = set().union(*[vals[j] for j in ins if isinstance(vals[j], set)]) if ins else set()
        if i in cancelled:      # cancel succeeds only before any input failed
            vals.append({i})
        elif failed:
            vals.append(failed)
        elif op == "fail":
            vals.append({i})
        elif op == "const":
            vals.append(extra)
        elif op == "scale":
            vals.append(vals[ins[0]] * np.float32(0.5) + np.float32(1.0))
        elif op in ("add", "gang"):
            vals.append(vals[ins[0]] + vals[ins[1]])
        elif op == "bf16":
            vals.append(vals[ins[0]].astype(ml_dtypes.bfloat16).astype(np.float32))
    return vals


@pytest.mark.parametrize("clock", ["real", "virtual"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_dags(devices, clock, seed):
    rng = np.random.default_rng(100 + seed)
    isls = make_islands(4, devices=devices)
    names = [i.name for i in isls]
    slow = Link(latency_s=0.02 if clock == "real" else 0.3, bandwidth_bytes_per_s=1e5)
    links = LinkModel(links={("island0", "island1"): slow, ("island2", "island3"): slow})
    clk = VirtualClock({n: float(rng.uniform(0.5, 2.0)) for n in names}) if clock == "virtual" else "real"
    nodes = make_dag(seed, names)
    with Runtime(isls, clock=clk, links=links) as rt:
        futs = submit(rt, nodes, rng)
        cancelled = set()
        queued = [i for i, f in enumerate(futs)
                  if nodes[i][0] in ("scale", "add") and not f.running() and not f.done()]
        for i in rng.permutation(queued)[:3]:
            if futs[i].cancel():
                cancelled.add(int(i))
        wait(futs, timeout=120)
        ref = reference(nodes, cancelled)
        for i, (f, want) in enumerate(zip(futs, ref)):
            assert f.done(), (i, nodes[i])
            if isinstance(want, set):
                roots = {futs[j]._exc for j in want}
                exc = f._exc
                assert exc is not None and any(exc is r for r in roots), (i, nodes[i], exc)
                if want <= cancelled:
                    assert isinstance(exc, CancelledError)
            else:
                np.testing.assert_allclose(f.result(), want, rtol=1e-5, err_msg=str((i, nodes[i])))
                assert f.result().sharding.device_set == set(rt.island(f.island).devices)
        if clock == "virtual":
            ends = [f.times[2] for f in futs if not f.cancelled()]
            assert all(e >= 0 for e in ends) and rt.now() == max(ends)
        n_fail = sum(isinstance(v, set) for v in ref)
        assert 0 < n_fail < len(nodes)   # the DAGs exercise both outcomes

"""Pathways micro-benchmarks on the pathways_lite runtime vs raw JAX, measured in the same run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch/bench_runtime.py --out=runtime.json
    python launch/bench_runtime.py --quick          # a few seconds, for smoke tests
    python launch/bench_runtime.py --trace_dir=runs/trace   # + trace.json / trace.png of a chained run

Islands: 2 devices or more -> two islands of one device each; one device
-> two virtual islands sharing it. Sections (JSON keys):
  gang     a trivial gang computation over both islands (scalar all-reduce,
           times 1/n, plus 1; each output feeds the next) run as OpByOp (one
           rt.gang per step, awaited each time), Chained (--n_chain gangs
           submitted through futures, awaited at the end) and Fused (one gang
           running a jitted fori_loop of --n_chain steps); the raw peer is the
           same jitted union computation called directly (chained, and
           dispatch+block_until_ready per op, and one fused fori_loop).
  call     the same for a trivial single-island rt.call (x + 1) chain vs jax.jit.
  utilization  chains of --util_ops calls of a loop of k matmuls (--matmul_dim)
           on each island, submitted alternately from the controller, for
           k = 1, 2, 4, ...: utilization = fused wall time (one jitted loop of
           the same ops per island, no per-op dispatch, each island's loop
           dispatched from its own thread) / runtime wall time, per island;
           reports the smallest op length with both >= 95% there and at the
           next length (a confirmation against timing noise). Each row also
           gives submit_ms (controller time to enqueue all the calls: about
           the op time x calls when dispatch blocks), the islands whose
           calls the runtime moved to dispatch threads (``offloaded``), and
           ``trace_busy``: each island's busy share in the runtime's own trace
           (time with one of its calls dispatched and not finished, from the
           first submit to its last completion; median over the trials), which
           needs no fused peer and so not its timing noise.
  virtual  events/s under the virtual clock: chained trivial calls across the
           islands (calls + transfers are events), and the simulation's own
           cost per event (minus raw jitted dispatch of the same calls).
Times are per op, median (and min) over --repeats interleaved trials.
Ratios are runtime / raw (1.0 = no overhead).
"""
import functools
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", "", "also write the JSON here")
flags.DEFINE_integer("n_chain", 128, "computations per Chained / Fused trial")
flags.DEFINE_integer("n_opbyop", 64, "computations per OpByOp trial")
flags.DEFINE_integer("repeats", 7, "interleaved trials per measurement")
flags.DEFINE_integer("matmul_dim", 256, "matrix size of the utilization computation")
flags.DEFINE_integer("max_loop", 4096, "largest matmul loop length tried for utilization")
flags.DEFINE_integer("util_ops", 16, "computations per island per utilization trial")
flags.DEFINE_float("util_budget_s", 30.0, "stop the utilization sweep after this much time")
flags.DEFINE_integer("virtual_events", 4000, "calls submitted for the virtual-clock measurement")
flags.DEFINE_bool("quick", False, "tiny sizes (smoke test)")
flags.DEFINE_string("trace_dir", "", "write trace.json / trace.png of a 2-island chained run here")
FLAGS = flags.FLAGS


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def trials(named, repeats):
    """Interleave the named measurements ``repeats`` times; seconds per op: median and min."""
    got = {k: [] for k in named}
    for _ in range(repeats):
        for k, (fn, n) in named.items():
            got[k].append(timed(fn) / n)
    return {k: {"median_us": 1e6 * statistics.median(v), "min_us": 1e6 * min(v)} for k, v in got.items()}


def ratio(a, b):
    return {"median": a["median_us"] / b["median_us"], "min": a["min_us"] / b["min_us"]}


def bench_gang(rt, islands, n_chain, n_opbyop, repeats):
    import jax
    import numpy as np
    from pathways_lite.futures import wait
    from pathways_lite.islands import GANG_AXIS, Union

    names = [i.name for i in islands]
    inv = 1.0 / len(names)

    def step(x):
        return jax.lax.psum(x, GANG_AXIS) * inv + 1.0

    def fused(x):
        return jax.lax.fori_loop(0, n_chain, lambda i, v: step(v), x)

    union = Union(islands)
    raw_step, raw_fused = union.compile(step), union.compile(fused)
    x0 = union.stack([jax.device_put(np.float32(i), isl.replicated()) for i, isl in enumerate(islands)])
    start = rt.gang(step, [np.float32(i) for i in range(len(names))], islands=names)
    wait(start)

    def ours_chained():
        fs = start
        for _ in range(n_chain):
            fs = rt.gang(step, fs, islands=names)
        wait(fs)
        return fs

    def ours_opbyop():
        fs = start
        for _ in range(n_opbyop):
            fs = rt.gang(step, fs, islands=names)
            wait(fs)
        return fs

    def ours_fused():
        fs = rt.gang(fused, start, islands=names)
        wait(fs)
        return fs

    def raw_chained():
        y = x0
        for _ in range(n_chain):
            y = raw_step(y)
        y.block_until_ready()

    def raw_sync():
        y = x0
        for _ in range(n_opbyop):
            y = raw_step(y)
            y.block_until_ready()

    def raw_fused_run():
        raw_fused(x0).block_until_ready()

    for fn in (ours_chained, ours_opbyop, ours_fused, raw_chained, raw_sync, raw_fused_run):
        fs = fn()  # compile + warm up
        if fs is not None:
            [f.result() for f in fs]  # raises if the runtime's computation failed
    check = rt.gang(step, start, islands=names)
    want = np.asarray(raw_step(raw_step(x0)))
    assert np.allclose([float(f.result()) for f in check], want), "gang result differs from raw jax"
    t = trials({"runtime_chained": (ours_chained, n_chain), "runtime_opbyop": (ours_opbyop, n_opbyop),
                "runtime_fused": (ours_fused, n_chain), "raw_chained": (raw_chained, n_chain),
                "raw_dispatch_sync": (raw_sync, n_opbyop), "raw_fused": (raw_fused_run, n_chain)}, repeats)
    t["ratio_chained"] = ratio(t["runtime_chained"], t["raw_chained"])
    t["ratio_opbyop"] = ratio(t["runtime_opbyop"], t["raw_dispatch_sync"])
    t["ratio_fused"] = ratio(t["runtime_fused"], t["raw_fused"])
    return t


def add1(x):
    return x + 1.0


def bench_call(rt, island, n_chain, n_opbyop, repeats):
    import jax
    import numpy as np

    raw = jax.jit(add1)
    x0 = jax.device_put(np.float32(0), island.replicated())
    first = rt.call(add1, x0, island=island.name)
    first.result()

    def ours_chained():
        f = first
        for _ in range(n_chain):
            f = rt.call(add1, f, island=island.name)
        f.result()
        return [f]

    def ours_opbyop():
        f = first
        for _ in range(n_opbyop):
            f = rt.call(add1, f, island=island.name)
            f.result()

    def raw_chained():
        y = x0
        for _ in range(n_chain):
            y = raw(y)
        y.block_until_ready()

    def raw_sync():
        y = x0
        for _ in range(n_opbyop):
            y = raw(y)
            y.block_until_ready()

    for fn in (ours_chained, ours_opbyop, raw_chained, raw_sync):
        fn()
    assert float(ours_chained()[0].result()) == float(first.result()) + n_chain
    t = trials({"runtime_chained": (ours_chained, n_chain), "runtime_opbyop": (ours_opbyop, n_opbyop),
                "raw_chained": (raw_chained, n_chain), "raw_dispatch_sync": (raw_sync, n_opbyop)}, repeats)
    t["ratio_chained"] = ratio(t["runtime_chained"], t["raw_chained"])
    t["ratio_opbyop"] = ratio(t["runtime_opbyop"], t["raw_dispatch_sync"])
    t["controller_overhead_us"] = t["runtime_chained"]["median_us"] - t["raw_chained"]["median_us"]
    return t


def matmul_loop(k, w, x):
    import jax
    import jax.numpy as jnp
    return jax.lax.fori_loop(0, k, lambda i, a: jnp.tanh(a @ w), x)


def bench_utilization(islands, dim, max_loop, n_ops, budget_s, repeats):
    import jax
    import numpy as np
    from pathways_lite.futures import as_completed
    from pathways_lite.runtime import Runtime

    rng = np.random.default_rng(0)
    w_host = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    x_host = rng.standard_normal((dim, dim)).astype(np.float32)
    rows, found, trace_found, t_begin = [], None, None, time.perf_counter()
    k = 1
    with Runtime(islands) as rt:
        w = [jax.device_put(w_host, i.replicated()) for i in islands]
        x = [jax.device_put(x_host, i.replicated()) for i in islands]
        while k <= max_loop and time.perf_counter() - t_begin < budget_s:
            op = functools.partial(matmul_loop, k)
            fused = jax.jit(functools.partial(matmul_loop, k * n_ops))

            def run_fused():
                # each island's fused loop is dispatched from its own thread: a dispatch that
                # blocks (GPU: a loop of small kernels is launched by the calling thread) must
                # not serialize the baseline's islands
                t0 = time.perf_counter()
                ends = [0.0] * len(islands)

                def one(j):
                    fused(w[j], x[j]).block_until_ready()
                    ends[j] = time.perf_counter() - t0

                threads = [threading.Thread(target=one, args=(j,)) for j in range(len(islands))]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                return ends

            def run_runtime():
                t0, r0 = time.perf_counter(), rt.now()
                last = list(x)
                for _ in range(n_ops):
                    last = [rt.call(op, wi, li, island=i.name) for wi, li, i in zip(w, last, islands)]
                submit_s.append(time.perf_counter() - t0)
                ends, r_end = {}, {}
                for f in as_completed(last):
                    ends[f.island] = time.perf_counter() - t0
                    r_end[f.island] = rt.now()
                # the islands' own busy share from the trace: time with a call dispatched and
                # not yet finished, from the first submit to the island's last completion
                busy_t.append([rt.trace.utilization(i.name, r0, r_end[i.name]) for i in islands])
                return [ends[i.name] for i in islands]

            submit_s, busy_t = [], []
            run_fused(), run_runtime()  # compile
            busy_t.clear()
            fused_t, ours_t = [], []
            for _ in range(max(3, repeats // 2)):
                fused_t.append(run_fused())
                ours_t.append(run_runtime())
            f_med = [statistics.median(t[j] for t in fused_t) for j in range(len(islands))]
            o_med = [statistics.median(t[j] for t in ours_t) for j in range(len(islands))]
            util = [min(1.0, a / b) for a, b in zip(f_med, o_med)]
            op_ms = 1e3 * max(f_med) / n_ops / (1 if islands[0].device_set != islands[1].device_set else 2)
            busy = [statistics.median(t[j] for t in busy_t) for j in range(len(islands))]
            row = {"loop": k, "op_ms": op_ms, "utilization": util, "trace_busy": busy,
                   "submit_ms": 1e3 * statistics.median(submit_s[1:]),
                   "offloaded": sorted(n for (f, n) in rt._policy.offloaded if f is op)
                   if rt._policy is not None else []}
            rows.append(row)
            if trace_found is None and min(busy) >= 0.95:
                trace_found = row
            elif min(busy) < 0.95:
                trace_found = None
            if min(util) >= 0.95:
                if found is not None:       # confirmed by the next (longer) length too
                    break
                found = row
            else:
                found = None
            k *= 2
        spans_util = {i.name: rt.trace.utilization(i.name) for i in islands}
    return {"matmul_dim": dim, "ops_per_island": n_ops, "sweep": rows,
            "smallest_op_ms_at_95pct": found["op_ms"] if found else None,
            # the same rule on the trace's busy shares, from this length on: every later one
            "smallest_op_ms_trace_busy_95pct": trace_found["op_ms"] if trace_found else None,
            "confirmed_at_next_length": bool(found) and rows[-1] is not found,
            "trace_utilization_last": spans_util}


def bench_virtual(islands, n_events):
    import jax
    import numpy as np
    from pathways_lite.clock import VirtualClock
    from pathways_lite.futures import wait
    from pathways_lite.runtime import Runtime

    names = [i.name for i in islands]
    raw = jax.jit(add1)
    x0 = [jax.device_put(np.float32(0), i.replicated()) for i in islands]

    def run(trace):
        clock = VirtualClock({n: 1.0 + j for j, n in enumerate(names)})
        with Runtime(islands, clock=clock, trace=trace) as rt:
            fs = [rt.call(add1, x, island=n) for x, n in zip(x0, names)]
            wait(fs)
            t0 = time.perf_counter()
            for j in range(n_events):
                k = j % len(names)
                # every 8th call reads the other island's value: a transfer event
                src = fs[(k + 1) % len(names)] if j % 8 == 0 else fs[k]
                fs[k] = rt.call(add1, src, island=names[k], cost=1 + (j % 3))
            wait(fs)
            wall = time.perf_counter() - t0
            events = clock._seq - 2
            return wall, events, rt.now()

    def raw_dispatch():
        ys = list(x0)
        t0 = time.perf_counter()
        for j in range(n_events):
            ys[j % len(ys)] = raw(ys[j % len(ys)])
        for y in ys:
            y.block_until_ready()
        return time.perf_counter() - t0

    run(False), raw_dispatch()
    wall, events, sim_now = min(run(True), run(True))
    wall_nt, _, _ = min(run(False), run(False))
    raw_wall = min(raw_dispatch(), raw_dispatch())
    sim_cost = max(wall - raw_wall, 1e-9) / events
    return {"calls": n_events, "events": events, "simulated_s": sim_now,
            "events_per_s": events / wall, "events_per_s_no_trace": events / wall_nt,
            "raw_dispatch_us_per_call": 1e6 * raw_wall / n_events,
            "simulation_us_per_event": 1e6 * sim_cost, "simulation_events_per_s": 1.0 / sim_cost}


def trace_run(islands, dim, loop, trace_dir):
    """A chained run on 2 islands with transfers and a closing gang: trace JSON + Gantt PNG."""
    import jax
    import numpy as np
    from pathways_lite.futures import wait
    from pathways_lite.islands import GANG_AXIS
    from pathways_lite.runtime import Runtime

    names = [i.name for i in islands]
    op = functools.partial(matmul_loop, loop)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    def gang_mean(v):
        return jax.lax.pmean(v, GANG_AXIS)

    with Runtime(islands) as rt:
        for _ in range(2):          # the first pass compiles; only the second is traced
            rt.trace.clear()
            xs = [rt.transfer(w, island=n) for n in names]
            ws = [rt.transfer(w, island=n) for n in names]
            wait(xs + ws)
            for step in range(12):
                xs = [rt.call(op, wi, x, island=n, name=f"mm{step}") for wi, x, n in zip(ws, xs, names)]
                if step % 4 == 3:   # swap: each island continues from the other's result
                    xs = [rt.call(op, wi, x, island=n, name=f"mm{step}'")
                          for wi, x, n in zip(ws, xs[::-1], names)]
            wait(rt.gang(gang_mean, xs, islands=names, name="pmean"))
        os.makedirs(trace_dir, exist_ok=True)
        return {"json": rt.trace.write(os.path.join(trace_dir, "trace.json")),
                "png": rt.trace.plot(os.path.join(trace_dir, "trace.png"),
                                     title="pathways_lite: 2 islands, chained matmul loops, "
                                           "cross-island transfers, a closing gang"),
                "utilization": {n: rt.trace.utilization(n) for n in names}}


def main(argv):
    del argv
    import jax
    from pathways_lite.islands import make_islands
    from pathways_lite.runtime import Runtime

    q = FLAGS.quick
    n_chain, n_obo = (16, 8) if q else (FLAGS.n_chain, FLAGS.n_opbyop)
    repeats = 2 if q else FLAGS.repeats
    devs = jax.devices()
    if len(devs) >= 2:
        islands = make_islands(2, devices=devs[:2], devices_per_island=1)
    else:
        islands = make_islands(2, devices=devs[:1], virtual=True)
    t0 = time.perf_counter()
    out = {"device": f"{devs[0].platform}:{devs[0].device_kind}", "n_devices": len(devs),
           "jax": jax.__version__, "islands": [[str(d) for d in i.devices] for i in islands],
           "virtual_islands": islands[0].device_set == islands[1].device_set,
           "n_chain": n_chain, "n_opbyop": n_obo, "repeats": repeats}
    with Runtime(islands, trace=False) as rt:
        out["gang"] = bench_gang(rt, islands, n_chain, n_obo, repeats)
        out["call"] = bench_call(rt, islands[0], n_chain, n_obo, repeats)
    out["utilization"] = bench_utilization(
        islands, 64 if q else FLAGS.matmul_dim, 4 if q else FLAGS.max_loop, 4 if q else FLAGS.util_ops,
        5.0 if q else FLAGS.util_budget_s, repeats)
    out["virtual"] = bench_virtual(islands, 200 if q else FLAGS.virtual_events)
    if FLAGS.trace_dir:
        found = out["utilization"]["sweep"][-1]["loop"]
        out["trace"] = trace_run(islands, 64 if q else FLAGS.matmul_dim, found, FLAGS.trace_dir)
    out["summary"] = {
        "gang_chained_ratio": out["gang"]["ratio_chained"]["median"],
        "gang_opbyop_ratio": out["gang"]["ratio_opbyop"]["median"],
        "gang_fused_ratio": out["gang"]["ratio_fused"]["median"],
        "call_chained_ratio": out["call"]["ratio_chained"]["median"],
        "call_chained_us": out["call"]["runtime_chained"]["median_us"],
        "raw_call_chained_us": out["call"]["raw_chained"]["median_us"],
        "smallest_op_ms_at_95pct": out["utilization"]["smallest_op_ms_at_95pct"],
        "smallest_op_ms_trace_busy_95pct": out["utilization"]["smallest_op_ms_trace_busy_95pct"],
        "virtual_events_per_s": out["virtual"]["events_per_s"],
        "virtual_simulation_events_per_s": out["virtual"]["simulation_events_per_s"],
    }
    out["wall_s"] = time.perf_counter() - t0
    from pathways_lite.metrics import emit_json
    emit_json(out, FLAGS.out)


if __name__ == "__main__":
    app.run(main)

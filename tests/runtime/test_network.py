"""Links: wire formats (error bounds, exact bytes), byte counters, real delays."""
import math
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from pathways_lite import network
from pathways_lite.clock import VirtualClock
from pathways_lite.network import Link, LinkModel, decode, encode, payload_nbytes
from pathways_lite.runtime import Runtime
from tests.runtime.conftest import add1

B = 64


def roundtrip(x, wire):
    payload = jax.jit(lambda v: encode(v, wire, B))(x)
    y = jax.jit(lambda p: decode(p, wire, B, x.shape, x.dtype))(payload)
    return np.asarray(y), sum(int(p.nbytes) for p in payload), payload


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 29)).astype(np.float32)   # 1073 elements: blocks do not divide it
    x[3, 4] = 40.0                                           # an outlier that hurts per-tensor scales
    return x


def block_amax(x):
    flat = np.abs(x.reshape(-1))
    flat = np.pad(flat, (0, -len(flat) % B))
    return np.repeat(flat.reshape(-1, B).max(axis=1), B)[: x.size].reshape(x.shape)


def test_bf16_roundtrip(data):
    y, nbytes, _ = roundtrip(data, "bf16")
    assert nbytes == 2 * data.size
    np.testing.assert_array_equal(y, data.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.all(np.abs(y - data) <= np.abs(data) * 2.0 ** -8)


def test_int8_per_tensor(data):
    y, nbytes, (q, s) = roundtrip(data, "int8")
    assert nbytes == data.size + 4 and q.dtype == np.int8
    assert np.max(np.abs(y - data)) <= np.max(np.abs(data)) / 127 / 2 * (1 + 1e-6)


def test_int8_per_block_is_tighter(data):
    y, nbytes, (q, s) = roundtrip(data, "int8_block")
    assert nbytes == data.size + 4 * math.ceil(data.size / B) and s.shape == (math.ceil(data.size / B),)
    assert np.all(np.abs(y - data) <= block_amax(data) / 127 / 2 * (1 + 1e-6) + 1e-12)
    y_tensor, _, _ = roundtrip(data, "int8")
    assert np.mean(np.abs(y - data)) < np.mean(np.abs(y_tensor - data))


def test_fp8_e4m3(data):
    y, nbytes, (q, s) = roundtrip(data, "fp8")
    assert nbytes == data.size + 4 and q.dtype == ml_dtypes.float8_e4m3fn
    scale = np.max(np.abs(data)) / 448.0
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormal spacing 2^-9 * scale
    assert np.all(np.abs(y - data) <= np.abs(data) * 2.0 ** -4 + scale * 2.0 ** -10 + 1e-12)


def test_int4_packed_two_per_byte(data):
    y, nbytes, (q, s) = roundtrip(data, "int4")
    n = data.size
    assert q.dtype == np.uint8 and q.shape == (math.ceil(n / 2),)
    assert nbytes == math.ceil(n / 2) + 4 * math.ceil(n / B)
    assert np.all(np.abs(y - data) <= block_amax(data) / 7 / 2 * (1 + 1e-6) + 1e-12)
    # exactly representable values survive: multiples of the block scale
    z = np.array([-7, -3, 0, 1, 5, 7, 2], np.float32)
    np.testing.assert_array_equal(roundtrip(z, "int4")[0], z)


def test_zeros_and_integers_pass_through():
    for wire in network.WIRE_DTYPES:
        np.testing.assert_array_equal(roundtrip(np.zeros(5, np.float32), wire)[0], np.zeros(5))
        ints = np.arange(-3, 4, dtype=np.int32)
        y, nbytes, _ = roundtrip(ints, wire)
        np.testing.assert_array_equal(y, ints)
        assert nbytes == ints.nbytes == payload_nbytes(ints.shape, ints.dtype, wire, B)


@pytest.mark.parametrize("wire", ["bf16", "int8", "int8_block", "fp8", "int4"])
def test_link_counts_the_real_payload_bytes(islands4, data, wire):
    links = LinkModel(links={("island0", "island2"): Link(wire_dtype=wire, block_size=B)})
    with Runtime(islands4, links=links) as rt:
        a = rt.call(add1, data, island="island0")
        b = rt.call(add1, a, island="island2")              # the link's wire format
        c = rt.transfer(a, island="island1", wire_dtype=wire)  # an explicit one on another link
        got_b, got_c = b.result(timeout=60), c.result(timeout=60)
        want = payload_nbytes(data.shape, data.dtype, wire, B)
        assert rt.links.bytes_sent("island0", "island2") == want
        assert rt.links.bytes_sent("island0", "island1") == payload_nbytes(data.shape, data.dtype, wire, 128)
        assert rt.links.bytes_sent() == rt.links.bytes_sent(src="island0") == want + rt.links.bytes_sent(dst="island1")
        np.testing.assert_allclose(got_b, roundtrip(data + 1, wire)[0] + 1, rtol=1e-6)
        assert got_b.sharding.device_set == set(islands4[2].devices)
        assert got_c.sharding.device_set == set(islands4[1].devices)


def test_real_link_delay_never_blocks_the_controller(islands4):
    link = Link(bandwidth_bytes_per_s=40_000, latency_s=0.1)       # 4000 bytes -> 0.1 + 0.1 s
    with Runtime(islands4, links=LinkModel(links={("island0", "island1"): link})) as rt:
        x = rt.call(add1, np.zeros(1000, np.float32), island="island0")
        for isl in ("island1", "island2"):   # compile first: only dispatch is timed below
            rt.call(add1, np.zeros(1000, np.float32), island=isl).result(timeout=60)
        x.result(timeout=60)
        t0 = time.perf_counter()
        y = rt.call(add1, x, island="island1")
        z = rt.call(add1, x, island="island2")                     # default link: no delay
        t_dispatch = time.perf_counter() - t0
        z.result(timeout=60)
        t_fast = time.perf_counter() - t0
        y.result(timeout=60)
        t_slow = time.perf_counter() - t0
        assert t_dispatch < 0.1 and t_fast < t_slow and t_slow >= link.seconds(4000)
        span = [s for s in rt.trace.spans if s.kind == "transfer" and s.island == "island1"][0]
        assert span.t_end - span.t_start >= link.seconds(4000) - 1e-3 and span.nbytes == 4000


def test_virtual_link_serializes_transfers(islands4):
    link = Link(bandwidth_bytes_per_s=4000, latency_s=0.5)
    clock = VirtualClock(default=0.0)
    with Runtime(islands4, clock=clock, links=LinkModel(default=link)) as rt:
        x = rt.call(add1, np.zeros(1000, np.float32), island="island0")
        ys = [rt.transfer(x, island="island1") for _ in range(3)]
        ends = [f.result() is not None and f.times[2] for f in ys]
        assert ends == pytest.approx([1.5, 3.0, 4.5])   # each: 0.5 + 4000 / 4000 s, one at a time


@pytest.mark.parametrize("kw,match", [
    (dict(bandwidth_bytes_per_s=0), "bandwidth"),
    (dict(latency_s=-1), "latency"),
    (dict(latency_s=math.inf), "latency"),
    (dict(wire_dtype="int3"), "wire_dtype"),
    (dict(block_size=3), "block_size"),
])
def test_link_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        Link(**kw)


def test_link_model_rejects_unknown_islands(islands4):
    with pytest.raises(ValueError, match="names island 'mars'"):
        Runtime(islands4, links=LinkModel(links={("island0", "mars"): Link()}))
    with pytest.raises(ValueError, match="pairs"):
        LinkModel(links={"island0": Link()})
    m = LinkModel(links={("a", "b"): Link(latency_s=1.0)})
    assert m.link("b", "a").latency_s == 1.0 and m.link("a", "c") == Link()

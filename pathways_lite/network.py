"""Links between islands: bandwidth, latency and what the payload looks like on the wire.

    links = LinkModel(default=Link(bandwidth_bytes_per_s=1e9, latency_s=1e-3),
                      links={("w0", "server"): Link(1e8, 5e-3, wire_dtype="int8")})
    rt = Runtime(islands, links=links)
    links.bytes_sent()                 # all bytes sent so far; bytes_sent("w0", "server") one link

A transfer of ``nbytes`` (the payload *as sent*, i.e. after quantization)
occupies its link for ``latency_s + nbytes / bandwidth_bytes_per_s``; a link
carries one transfer at a time. Under the real clock the runtime really waits
that long on a transfer thread (never on the controller); under the virtual
clock the time is only accounted. The data itself always moves through the
real device-to-device path (``jax.device_put``).

Wire formats (``wire_dtype``), applied to floating-point leaves only (others
are sent as they are):

============  =========================================================  =====================
name          encoding                                                   bytes for n elements
============  =========================================================  =====================
None          as is                                                      n * itemsize
"bf16"        cast to bfloat16                                           2n
"int8"        round(x / s), s = max|x| / 127 per tensor                  n + 4
"int8_block"  same with one scale per block of ``block_size`` elements    n + 4 * ceil(n / B)
"fp8"         float8_e4m3fn of x / s, s = max|x| / 448 per tensor         n + 4
"int4"        round(x / s) in [-7, 7], s per block, two per byte          ceil(n / 2) + 4 * ceil(n / B)
============  =========================================================  =====================

``encode`` / ``decode`` are plain jittable functions, usable without a runtime.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

WIRE_DTYPES = (None, "bf16", "int8", "int8_block", "fp8", "int4")
_ALIASES = {"bfloat16": "bf16", "float8_e4m3fn": "fp8", "e4m3": "fp8", "fp8_e4m3": "fp8",
            "float32": None, "fp32": None, "none": None}
_FP8_MAX = 448.0


def canonical_wire_dtype(wire_dtype):
    """The canonical name of ``wire_dtype``; raises ValueError naming the allowed ones."""
    if wire_dtype is None:
        return None
    if isinstance(wire_dtype, str):
        name = _ALIASES.get(wire_dtype.lower(), wire_dtype.lower())
        if name in WIRE_DTYPES:
            return name
    raise ValueError(f"unknown wire_dtype {wire_dtype!r}; allowed: {WIRE_DTYPES} "
                     f"(aliases {sorted(_ALIASES)})")


@dataclasses.dataclass(frozen=True)
class Link:
    """One directed link: ``latency_s + nbytes / bandwidth_bytes_per_s`` per transfer."""

    bandwidth_bytes_per_s: float = math.inf
    latency_s: float = 0.0
    wire_dtype: str | None = None
    block_size: int = 128

    def __post_init__(self):
        bw, lat = self.bandwidth_bytes_per_s, self.latency_s
        if not isinstance(bw, (int, float)) or not bw > 0:
            raise ValueError(f"Link.bandwidth_bytes_per_s must be > 0 (math.inf for unlimited), got {bw!r}")
        if not isinstance(lat, (int, float)) or not (lat >= 0 and math.isfinite(lat)):
            raise ValueError(f"Link.latency_s must be a finite number >= 0, got {lat!r}")
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"Link.block_size must be an even int >= 2, got {self.block_size!r}")
        object.__setattr__(self, "wire_dtype", canonical_wire_dtype(self.wire_dtype))

    @property
    def delayed(self) -> bool:
        """Whether a transfer takes any time on this link."""
        return self.latency_s > 0 or math.isfinite(self.bandwidth_bytes_per_s)

    def seconds(self, nbytes: int) -> float:
        """Time the link is busy sending ``nbytes``."""
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


class LinkModel:
    """The links of every ordered island pair: ``links`` overrides, ``default`` for the rest.

    ``symmetric=True`` makes a link given for (a, b) also serve (b, a) unless
    (b, a) is given too. Counts the bytes sent per ordered pair (thread-safe).
    """

    def __init__(self, default: Link | None = None, links: dict | None = None, symmetric: bool = True):
        self.default = Link() if default is None else default
        if not isinstance(self.default, Link):
            raise TypeError(f"LinkModel.default must be a Link, got {type(self.default).__name__}")
        self._links = {}
        for key, link in (links or {}).items():
            if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
                raise ValueError(f"LinkModel.links keys must be (src_island, dst_island) name pairs, got {key!r}")
            if not isinstance(link, Link):
                raise TypeError(f"LinkModel.links[{key!r}] must be a Link, got {type(link).__name__}")
            self._links[key] = link
        if symmetric:
            for (a, b), link in list(self._links.items()):
                self._links.setdefault((b, a), link)
        self._bytes = {}
        self._count = {}
        self._lock = threading.Lock()

    def validate(self, island_names) -> None:
        names = set(island_names)
        for a, b in self._links:
            for n in (a, b):
                if n not in names:
                    raise ValueError(f"LinkModel names island {n!r} in link ({a!r}, {b!r}); "
                                     f"the runtime's islands are {sorted(names)}")

    def link(self, src: str, dst: str) -> Link:
        return self._links.get((src, dst), self.default)

    def record(self, src: str, dst: str, nbytes: int) -> None:
        with self._lock:
            key = (src, dst)
            self._bytes[key] = self._bytes.get(key, 0) + int(nbytes)
            self._count[key] = self._count.get(key, 0) + 1

    def bytes_sent(self, src: str | None = None, dst: str | None = None) -> int:
        """Bytes sent over (src, dst); either left out sums over all islands in that role."""
        with self._lock:
            return sum(v for (a, b), v in self._bytes.items()
                       if (src is None or a == src) and (dst is None or b == dst))

    def stats(self) -> dict:
        """{"src->dst": {"bytes": int, "transfers": int}} for every pair used so far."""
        with self._lock:
            return {f"{a}->{b}": {"bytes": v, "transfers": self._count[(a, b)]}
                    for (a, b), v in sorted(self._bytes.items())}

    def state_dict(self) -> dict:
        with self._lock:
            return {"bytes": [[a, b, v, self._count[(a, b)]] for (a, b), v in sorted(self._bytes.items())]}

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            self._bytes = {(a, b): int(v) for a, b, v, _ in state["bytes"]}
            self._count = {(a, b): int(c) for a, b, _, c in state["bytes"]}


# ----------------------------------------------------------------------------------------------
# Wire codecs (pure, jittable).

def _blocks(x, block):
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    nb = -(-n // block)
    padded = jnp.pad(flat, (0, nb * block - n)).reshape(nb, block)
    return padded, n


def _scale(amax, qmax):
    return jnp.where(amax > 0, amax / qmax, jnp.float32(1.0)).astype(jnp.float32)


def encode(x, wire_dtype, block_size=128):
    """The payload (a tuple of arrays) that represents ``x`` on the wire."""
    wire_dtype = canonical_wire_dtype(wire_dtype)
    if wire_dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return (x,)
    if wire_dtype == "bf16":
        return (x.astype(jnp.bfloat16),)
    if wire_dtype in ("int8", "fp8"):
        xf = x.astype(jnp.float32)
        qmax = 127.0 if wire_dtype == "int8" else _FP8_MAX
        s = _scale(jnp.max(jnp.abs(xf)), qmax)
        if wire_dtype == "int8":
            q = jnp.clip(jnp.round(xf / s), -127, 127).astype(jnp.int8)
        else:
            q = jnp.clip(xf / s, -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn)
        return (q, s)
    blocks, n = _blocks(x, block_size)
    qmax = 127.0 if wire_dtype == "int8_block" else 7.0
    s = _scale(jnp.max(jnp.abs(blocks), axis=1), qmax)
    q = jnp.clip(jnp.round(blocks / s[:, None]), -qmax, qmax).reshape(-1)
    if wire_dtype == "int8_block":
        return (q[:n].astype(jnp.int8), s)
    nibbles = (q[: n + (n % 2)] + 8).astype(jnp.uint8).reshape(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4), s)


def decode(payload, wire_dtype, block_size, shape, dtype):
    """Inverse of :func:`encode`: an array of ``shape`` and ``dtype``."""
    wire_dtype = canonical_wire_dtype(wire_dtype)
    if len(payload) == 1:
        return payload[0].astype(dtype)
    q, s = payload
    if wire_dtype in ("int8", "fp8"):
        return (q.astype(jnp.float32) * s).astype(dtype)
    n = math.prod(shape)
    if wire_dtype == "int4":
        lo = (q & 0xF).astype(jnp.float32) - 8
        hi = (q >> 4).astype(jnp.float32) - 8
        q = jnp.stack([lo, hi], axis=1).reshape(-1)[:n]
    nb = s.shape[0]
    blocks = jnp.pad(q.astype(jnp.float32), (0, nb * block_size - n)).reshape(nb, block_size)
    return (blocks * s[:, None]).reshape(-1)[:n].reshape(shape).astype(dtype)


def payload_nbytes(shape, dtype, wire_dtype, block_size=128) -> int:
    """Bytes :func:`encode` sends for an array of ``shape`` and ``dtype`` (for checks and planning)."""
    wire_dtype = canonical_wire_dtype(wire_dtype)
    n = math.prod(shape)
    dtype = np.dtype(dtype)
    if wire_dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return n * dtype.itemsize
    nb = -(-n // block_size)
    return {"bf16": 2 * n, "int8": n + 4, "fp8": n + 4, "int8_block": n + 4 * nb,
            "int4": -(-n // 2) + 4 * nb}[wire_dtype]


def target_sharding(x, island, spec=None):
    """Where ``x`` lands on ``island``: ``spec`` if given, else x's PartitionSpec if the island's
    mesh has the same axes and shape, else replicated."""
    if spec is not None:
        return island.sharding(spec)
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding) and tuple(sh.mesh.axis_names) == tuple(island.mesh.axis_names) \
            and sh.mesh.devices.shape == island.mesh.devices.shape:
        return _named(island.mesh, sh.spec)
    return island.replicated()


@functools.lru_cache(maxsize=4096)
def _named(mesh, spec):
    return NamedSharding(mesh, spec)


def move(value, island, wire_dtype=None, block_size=128, spec=None):
    """Send the pytree ``value`` to ``island`` over the real device path, encoded as ``wire_dtype``.

    Floating-point leaves are encoded on their source devices, the payload is
    ``jax.device_put`` to the island and decoded there. Returns (value on the
    island, payload bytes sent). Nothing blocks: all steps are dispatched
    asynchronously.
    """
    leaves, tdef = jax.tree_util.tree_flatten(value)
    out, nbytes = [], 0
    for x in leaves:
        if not isinstance(x, jax.Array):
            x = np.asarray(x)
        target = target_sharding(x, island, spec)
        if wire_dtype is None or not np.issubdtype(x.dtype, np.floating):
            out.append(jax.device_put(x, target))
            nbytes += x.nbytes
            continue
        if not isinstance(x, jax.Array):
            x = jax.device_put(x, target)
        payload = encoder(wire_dtype, block_size)(x)
        nbytes += sum(p.nbytes for p in payload)
        moved = jax.device_put(payload, island.replicated())
        out.append(decoder(wire_dtype, block_size, tuple(x.shape), x.dtype, target)(moved))
    return jax.tree_util.tree_unflatten(tdef, out), nbytes


@functools.lru_cache(maxsize=None)
def encoder(wire_dtype, block_size):
    """Jitted encode for one wire format."""
    return jax.jit(functools.partial(encode, wire_dtype=wire_dtype, block_size=block_size))


@functools.lru_cache(maxsize=None)
def decoder(wire_dtype, block_size, shape, dtype, sharding):
    """Jitted decode for one wire format and output shape, placed with ``sharding``."""
    fn = functools.partial(decode, wire_dtype=wire_dtype, block_size=block_size, shape=shape, dtype=dtype)
    return jax.jit(fn, out_shardings=sharding)

"""OuterConfig: the `outer` section of a run config, as a frozen, validated dataclass.

`configs/base.py` builds its `outer` section from `OuterConfig().to_dict()`, so
every field below is a config field with this default. `OuterConfig.from_config`
checks every value before anything is built or compiled and raises ValueError
naming `outer.<field>` and what is allowed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pathways_lite import configuration

ALGORITHMS = ("single", "ddp", "local_sgd", "diloco", "streaming", "eager", "async_local_sgd")
INNER_OPTIMIZERS = ("adamw", "sgd")
OUTER_OPTIMIZERS = ("sgd", "sgdm", "nesterov", "adam")
WEIGHTINGS = ("uniform", "shard_size")
FRAGMENT_PATTERNS = ("strided", "sequential")
WIRE_DTYPES = ("float32", "bf16", "fp8", "int8", "int8_block", "int4")  # network.py wire formats
EAGER_MODES = ("eager", "delayed")
ASYNC_OUTER = ("naive", "dn")
SHARD_SAMPLING = ("own", "least_progress")
CLOCKS = ("virtual", "real")
ISLANDS = ("virtual", "devices")
COLLECTIVES = ("server", "xla", "pallas")  # ddp's gradient exchange (pathways_lite/outer/ddp_collective.py)
INNER_LOOPS = ("auto", "scan", "steps")   # how a phase runs (pathways_lite/outer/inner.py)
MESH_ALGORITHMS = ("ddp", "local_sgd", "diloco", "streaming")   # islands of several devices


@dataclasses.dataclass(frozen=True)
class OuterConfig:
  """Every outer-loop knob. Steps are inner steps; times are simulated seconds."""

  algorithm: str = "single"        # one of ALGORITHMS ("single": one island, plain AdamW)
  num_workers: int = 1             # M: workers = islands (or virtual islands)
  inner_steps: int = 500           # H: inner steps between outer syncs (ddp ignores it)
  inner_optimizer: str = "adamw"   # adamw: train.* hyper-parameters; sgd: plain SGD on train.lr schedule
  # a phase of H inner steps as one lax.scan call, or as a chain of H single-step calls (diloco and
  # local_sgd, local runtime); auto: scan (outer/inner.py gives the measurements)
  inner_loop: str = "auto"
  optimizer: str = "nesterov"      # outer optimizer: sgd (lr 1 = FedAvg) | sgdm | nesterov | adam
  lr: float = 0.7                  # outer learning rate
  momentum: float = 0.9            # sgdm / nesterov / DN momentum
  b1: float = 0.9                  # adam
  b2: float = 0.999                # adam
  eps: float = 1e-8                # adam
  weighting: str = "shard_size"    # average pseudo-gradients uniformly or by shard tokens
  drop_prob: float = 0.0           # each pseudo-gradient is dropped with this probability
  worker_schedule: tuple = ()      # elastic: active workers per equal slice of training; () = all M
  # streaming DiLoCo
  num_fragments: int = 1           # groups of transformer blocks (+1 fragment: embeddings etc.)
  fragment_pattern: str = "strided"
  overlap_tau: int = 0             # inner steps a fragment's sync overlaps before the merge
  merge_alpha: float = 0.0         # theta_m <- alpha*theta_m + (1-alpha)*theta after the sync
  wire_dtype: str = "float32"      # outer gradients on the wire (int4: 4-bit); sums stay f32
  # eager updates
  eager_mode: str = "eager"        # eager: own fresh + others delayed | delayed: all delayed
  overlap_outer_steps: int = 1     # d: outer step t's exchange lands at step t+d (0: no overlap)
  # asynchronous Local-SGD
  async_outer: str = "dn"          # naive: outer optimizer on every arrival | dn: delayed Nesterov
  dn_buffer: int = 0               # N for DN; 0 = num_workers
  dn_c: float = 0.0                # DN momentum activation, in [0, 1/N]
  dylu: bool = False               # dynamic local updates: H_w = floor(v_w / max v * H)
  grace_period_s: float = 0.0      # arrivals this close after another are applied together
  shard_sampling: str = "own"      # own shard, or the shard with least progress (sampled)
  # simulation
  clock: str = "virtual"           # virtual: deterministic simulated time | real: wall time
  islands: str = "virtual"         # virtual: M virtual islands on one device | devices: 1 device each
  # islands of several devices (outer.islands="devices" only): each worker island gets
  # island_data * island_tensor consecutive devices as a (data, fsdp=1, tensor) mesh
  # (models/sharding.py); its inner computations run data + tensor parallel on it
  island_data: int = 1
  island_tensor: int = 1
  step_time_s: tuple = ()          # simulated seconds per inner step for each worker; () = 1.0
  outer_island: int = 0            # the island that runs the outer optimizer
  link_bandwidth_gbps: float = 0.0  # between islands; 0 = infinite
  link_latency_s: float = 0.0
  # ddp only: "server" sends every gradient to the server island (transfers); "xla" / "pallas"
  # all-reduce them across the worker islands in one gang computation (ops.collectives)
  collectives: str = "server"

  # ---- construction ----------------------------------------------------------------
  @classmethod
  def from_config(cls, outer: Mapping[str, Any] | Any) -> "OuterConfig":
    d = outer.to_dict() if hasattr(outer, "to_dict") else dict(outer)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
      raise ValueError(f"unknown config field(s) {['outer.' + k for k in unknown]}; "
                       f"allowed: {['outer.' + k for k in allowed]}")
    for k in ("worker_schedule", "step_time_s"):
      if k in d and isinstance(d[k], list):
        d[k] = tuple(d[k])
    return cls(**d).validate()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ---- derived ---------------------------------------------------------------------
  @property
  def step_times(self) -> tuple[float, ...]:
    return tuple(float(t) for t in self.step_time_s) or (1.0,) * self.num_workers

  @property
  def island_devices(self) -> int:
    """Devices per worker island (1: the default one-device islands)."""
    return self.island_data * self.island_tensor

  @property
  def island_field(self) -> str:
    """The field that makes islands several devices wide, for error messages."""
    return "island_data" if self.island_data > 1 else "island_tensor"

  @property
  def buffer_size(self) -> int:
    return self.dn_buffer or self.num_workers

  # ---- validation ------------------------------------------------------------------
  def validate(self) -> "OuterConfig":
    _choice("algorithm", self.algorithm, ALGORITHMS)
    _int("num_workers", self.num_workers, 1)
    _int("inner_steps", self.inner_steps, 1)
    _choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
    _choice("inner_loop", self.inner_loop, INNER_LOOPS)
    if self.inner_loop == "steps" and self.algorithm not in ("diloco", "local_sgd"):
      raise ValueError(f"config field 'outer.inner_loop'='steps' is supported by outer.algorithm "
                       f"in ['diloco', 'local_sgd'], not {self.algorithm!r}; allowed here: "
                       "['auto', 'scan']")
    _choice("optimizer", self.optimizer, OUTER_OPTIMIZERS)
    _num("lr", self.lr, 0.0, lo_open=True)
    _num("momentum", self.momentum, 0.0, 1.0, hi_open=True)
    _num("b1", self.b1, 0.0, 1.0, hi_open=True)
    _num("b2", self.b2, 0.0, 1.0, hi_open=True)
    _num("eps", self.eps, 0.0, lo_open=True)
    _choice("weighting", self.weighting, WEIGHTINGS)
    _num("drop_prob", self.drop_prob, 0.0, 1.0, hi_open=True)
    for n in self.worker_schedule:
      _int("worker_schedule[]", n, 1, self.num_workers)
    _int("num_fragments", self.num_fragments, 1)
    _choice("fragment_pattern", self.fragment_pattern, FRAGMENT_PATTERNS)
    _int("overlap_tau", self.overlap_tau, 0)
    _num("merge_alpha", self.merge_alpha, 0.0, 1.0)
    _choice("wire_dtype", self.wire_dtype, WIRE_DTYPES)
    if self.algorithm == "streaming":
      F = self.num_fragments + 1
      if F > self.inner_steps:
        raise ValueError(f"outer.inner_steps={self.inner_steps} must be >= num_fragments+1={F}")
      if self.overlap_tau > self.inner_steps // F:
        raise ValueError(f"outer.overlap_tau={self.overlap_tau} must be <= inner_steps // "
                         f"(num_fragments+1) = {self.inner_steps // F} (one fragment in flight)")
    _choice("eager_mode", self.eager_mode, EAGER_MODES)
    _int("overlap_outer_steps", self.overlap_outer_steps, 0, 8)
    _choice("async_outer", self.async_outer, ASYNC_OUTER)
    _int("dn_buffer", self.dn_buffer, 0)
    _num("dn_c", self.dn_c, 0.0, 1.0 / self.buffer_size)
    if not isinstance(self.dylu, bool):
      raise ValueError(f"config field 'outer.dylu' must be a bool, got {self.dylu!r}")
    _num("grace_period_s", self.grace_period_s, 0.0)
    _choice("shard_sampling", self.shard_sampling, SHARD_SAMPLING)
    _choice("clock", self.clock, CLOCKS)
    _choice("islands", self.islands, ISLANDS)
    _int("island_data", self.island_data, 1)
    _int("island_tensor", self.island_tensor, 1)
    field = self.island_field
    if self.island_devices > 1 and self.algorithm not in MESH_ALGORITHMS:
      raise ValueError(f"config field 'outer.{field}'={getattr(self, field)} (islands of several "
                       f"devices) is supported by outer.algorithm in {list(MESH_ALGORITHMS)}, not "
                       f"{self.algorithm!r}; allowed here: 1")
    if self.island_devices > 1 and self.islands != "devices":
      raise ValueError(f"config field 'outer.{field}'={getattr(self, field)} needs "
                       f"outer.islands='devices' (virtual islands keep one device; got "
                       f"outer.islands={self.islands!r}); allowed here: 1")
    if self.step_time_s:
      if len(self.step_time_s) != self.num_workers:
        raise ValueError(f"config field 'outer.step_time_s' needs one entry per worker "
                         f"({self.num_workers}), got {self.step_time_s!r}")
      for t in self.step_time_s:
        _num("step_time_s[]", t, 0.0, lo_open=True)
    _int("outer_island", self.outer_island, 0, self.num_workers - 1)
    _num("link_bandwidth_gbps", self.link_bandwidth_gbps, 0.0)
    _num("link_latency_s", self.link_latency_s, 0.0)
    _choice("collectives", self.collectives, COLLECTIVES)
    if self.collectives != "server":
      if self.algorithm != "ddp":
        raise ValueError(f"config field 'outer.collectives'={self.collectives!r} is supported by "
                         f"outer.algorithm='ddp' only, not {self.algorithm!r}; allowed here: "
                         "['server']")
      if self.islands != "devices":
        raise ValueError(f"config field 'outer.collectives'={self.collectives!r} all-reduces across "
                         "worker islands with distinct devices: set outer.islands='devices' "
                         f"(got {self.islands!r}), or use outer.collectives='server'")
    return self


def check_island_mesh(config, ocfg: OuterConfig, num_devices: int) -> None:
  """Islands of several devices: raises ValueError naming the field before anything compiles."""
  k = ocfg.island_devices
  if k == 1:
    return
  need = ocfg.num_workers * k
  if need > num_devices:
    raise ValueError(
        f"config field 'outer.{ocfg.island_field}': outer.num_workers={ocfg.num_workers} islands x "
        f"outer.island_data={ocfg.island_data} x outer.island_tensor={ocfg.island_tensor} need "
        f"{need} devices, only {num_devices} available")
  if config.data.batch_size % ocfg.island_data:
    raise ValueError(f"config field 'outer.island_data'={ocfg.island_data} must divide "
                     f"data.batch_size={config.data.batch_size} (batches split over 'data')")
  m = config.model
  if m.get("tp_collectives", "gspmd") != "gspmd":
    T = ocfg.island_tensor
    for name, size in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.num_kv_heads),
                       ("data.seq_len", config.data.seq_len)):
      if size % T:
        raise ValueError(f"config field 'outer.island_tensor'={T} must divide {name}={size} "
                         f"(model.tp_collectives={m.tp_collectives!r} splits it over 'tensor')")


def _choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"config field 'outer.{field}'={value!r} is not allowed; "
                     f"allowed values: {list(allowed)}")


def _int(field, value, lo, hi=None):
  configuration.check_int(f"outer.{field}", value, lo, hi)


def _num(field, value, lo, hi=None, lo_open=False, hi_open=False):
  configuration.check_number(f"outer.{field}", value, lo, hi, lo_open, hi_open)

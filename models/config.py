"""ModelConfig: the frozen dataclass that builds a DecoderLM.

ml_collections ConfigDicts stop at this boundary: `ModelConfig.from_dict`
accepts a plain dict or a ConfigDict, rejects unknown keys, and validates every
field before anything is traced or compiled.

Byte tokenizer ids (shared with pathways_lite/data.py): bytes 0..255, then
PAD_ID=256, BOS_ID=257, EOS_ID=258, so the default vocab_size is 259.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
BYTE_VOCAB_SIZE = 259

RMS_NORM_EPS = 1e-6

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
REMAT_POLICIES = ("none", "full", "dots")
# How the decoder blocks use the mesh's "tensor" axis: "gspmd" lets XLA partition the
# sharded params (models/sharding.py); "xla" / "pallas" run each block under shard_map in
# Megatron sequence-parallel style with ops.collectives of that implementation
# (models/tensor_parallel.py).
TP_COLLECTIVES = ("gspmd", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only LM hyper-parameters (defaults: a tiny CPU model)."""

  vocab_size: int = BYTE_VOCAB_SIZE
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4  # grouped-query attention when < num_heads
  head_dim: int = 0  # 0 -> d_model // num_heads
  d_ff: int = 0  # 0 -> 8/3 * d_model rounded up to a multiple of 64
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  dropout_rate: float = 0.0
  attention_impl: str = "xla"
  remat: str = "none"
  init_std: float = 0.02
  tp_collectives: str = "gspmd"

  def __post_init__(self):
    self.validate()

  # ---- derived sizes -------------------------------------------------------
  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim else self.d_model // self.num_heads

  @property
  def resolved_d_ff(self) -> int:
    if self.d_ff:
      return self.d_ff
    raw = 8 * self.d_model / 3
    return int(-(-raw // 64) * 64)

  # ---- construction --------------------------------------------------------
  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | Any) -> "ModelConfig":
    """Builds from a dict or an ml_collections.ConfigDict; rejects unknown keys."""
    if hasattr(d, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
      d = d.to_dict()
    if not isinstance(d, Mapping):
      raise TypeError(
          f"ModelConfig.from_dict expects a dict or ConfigDict, got {type(d).__name__}"
      )
    allowed = cls.field_names()
    unknown = sorted(k for k in d if k not in allowed)
    if unknown:
      raise ValueError(
          f"unknown model config field(s) {unknown}; allowed fields: {list(allowed)}"
      )
    return cls(**dict(d))  # __post_init__ validates

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  # ---- validation ----------------------------------------------------------
  def validate(self) -> "ModelConfig":
    """Raises ValueError naming the offending field and what is allowed."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "num_kv_heads", "max_seq_len"):
      _check_int(name, getattr(self, name), minimum=1)
    for name in ("head_dim", "d_ff"):
      _check_int(name, getattr(self, name), minimum=0)
    if self.head_dim == 0 and self.d_model % self.num_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must divide d_model={self.d_model} when "
          "head_dim=0 (or set head_dim explicitly)"
      )
    if self.resolved_head_dim % 2:
      raise ValueError(
          f"head_dim must be even for RoPE, got {self.resolved_head_dim} "
          f"(head_dim={self.head_dim}, d_model={self.d_model}, num_heads={self.num_heads})"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
      )
    for name in ("param_dtype", "compute_dtype"):
      _check_choice(name, getattr(self, name), DTYPES)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    _check_choice("tp_collectives", self.tp_collectives, TP_COLLECTIVES)
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
    _check_float("rope_theta", self.rope_theta, lo=0.0, lo_open=True)
    _check_float("init_std", self.init_std, lo=0.0, lo_open=True)
    _check_float("dropout_rate", self.dropout_rate, lo=0.0, hi=1.0)
    if self.tp_collectives != "gspmd" and self.dropout_rate > 0:
      raise ValueError(
          f"tp_collectives={self.tp_collectives!r} runs the blocks under shard_map without "
          f"dropout; got dropout_rate={self.dropout_rate} (allowed: 0.0, or tp_collectives='gspmd')")
    return self


def validate_seq_len(cfg: ModelConfig, seq_len: int) -> None:
  """Raises ValueError if seq_len is not in [1, cfg.max_seq_len]."""
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  if seq_len > cfg.max_seq_len:
    raise ValueError(
        f"seq_len={seq_len} exceeds model max_seq_len={cfg.max_seq_len}; "
        "allowed: 1..max_seq_len (raise model.max_seq_len or shorten the sequences)"
    )


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name, value, lo, lo_open=False, hi=None):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a number, got {value!r}")
  bad_lo = value <= lo if lo_open else value < lo
  bad_hi = hi is not None and value >= hi
  if bad_lo or bad_hi:
    lo_s = f"> {lo}" if lo_open else f">= {lo}"
    hi_s = f" and < {hi}" if hi is not None else ""
    raise ValueError(f"{name} must be {lo_s}{hi_s}, got {value}")


def _check_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed; allowed values: {list(allowed)}")

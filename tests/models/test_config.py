"""ModelConfig validation: bad values raise before any compile, naming the field."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from models import DecoderLM, ModelConfig, validate_seq_len
from models.config import ATTENTION_IMPLS, PAD_ID


def test_defaults_are_the_tiny_byte_model():
  cfg = ModelConfig()
  assert cfg.vocab_size == PAD_ID + 3  # bytes, PAD, BOS, EOS
  assert cfg.resolved_head_dim * cfg.num_heads == cfg.d_model
  assert cfg.resolved_d_ff % 64 == 0
  assert cfg.resolved_d_ff >= 8 * cfg.d_model / 3 > cfg.resolved_d_ff - 64


def test_from_dict_accepts_dict_and_configdict():
  d = {"d_model": 64, "num_layers": 1, "num_kv_heads": 2, "attention_impl": "xla"}
  a = ModelConfig.from_dict(d)
  b = ModelConfig.from_dict(ml_collections.ConfigDict(d))
  assert a == b == dataclasses.replace(ModelConfig(), **d)
  assert ModelConfig.from_dict(a.to_dict()) == a


def test_unknown_key_names_it_and_lists_allowed():
  with pytest.raises(ValueError, match=r"num_layer'.*allowed fields.*num_layers"):
    ModelConfig.from_dict({"num_layer": 3})


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=130, num_heads=4), "num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(compute_dtype="float16"), "compute_dtype"),
    (dict(param_dtype="f32"), "param_dtype"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(remat="some"), "remat"),
    (dict(d_model=0), "d_model"),
    (dict(num_layers=-1), "num_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(head_dim=7), "head_dim"),
    (dict(init_std=0.0), "init_std"),
])
def test_bad_values_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    ModelConfig.from_dict(kwargs)


def test_allowed_values_are_listed():
  with pytest.raises(ValueError) as e:
    ModelConfig(attention_impl="flash")
  for impl in ATTENTION_IMPLS:
    assert impl in str(e.value)


def test_seq_len_over_max_raises_before_compile():
  cfg = dataclasses.replace(ModelConfig(), d_model=16, num_layers=1, max_seq_len=8)
  validate_seq_len(cfg, 8)
  with pytest.raises(ValueError, match="max_seq_len"):
    validate_seq_len(cfg, 9)
  # the model refuses at trace time (eval_shape traces, never compiles)
  with pytest.raises(ValueError, match="max_seq_len"):
    jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="tokens"):
    jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.float32))

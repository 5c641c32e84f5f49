"""param_count, FLOPs per token, peak FLOP/s lookup and MFU."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import DecoderLM, ModelConfig, flops_per_token, mfu, param_count, peak_flops_per_s
from models.utils import matmul_param_count


def params_of(cfg):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), tokens)["params"]


def test_param_count_sums_leaves():
  tree = {"a": np.zeros((3, 4)), "b": [np.zeros(5), {"c": np.zeros((2, 2, 2))}]}
  assert param_count(tree) == 12 + 5 + 8


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_are_params_minus_norms_and_lookup(tie):
  cfg = dataclasses.replace(ModelConfig(), num_kv_heads=2, tie_embeddings=tie)
  n = param_count(params_of(cfg))
  norms = (2 * cfg.num_layers + 1) * cfg.d_model
  lookup = 0 if tie else cfg.vocab_size * cfg.d_model  # untied: the embedding is not a matmul
  assert matmul_param_count(cfg) == n - norms - lookup


def test_flops_close_to_6n_when_attention_is_negligible():
  cfg = dataclasses.replace(ModelConfig(), d_model=256, num_layers=2)
  n = param_count(params_of(cfg))
  short = flops_per_token(cfg, seq_len=1)
  assert short == pytest.approx(6 * n, rel=1e-2)
  # the attention term grows linearly with the sequence length
  long = flops_per_token(cfg, seq_len=cfg.max_seq_len)
  assert long - short == pytest.approx(
      12 * cfg.num_layers * cfg.d_model * (cfg.max_seq_len - 1), rel=1e-9)


def test_peak_and_mfu():
  fake = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert peak_flops_per_s(fake("NVIDIA H100 80GB HBM3")) == 989e12
  assert peak_flops_per_s(fake("NVIDIA H200")) == 989e12
  assert peak_flops_per_s(fake("NVIDIA A100-SXM4-80GB")) == 312e12
  assert peak_flops_per_s(fake("TPU v5 lite")) == 197e12
  assert peak_flops_per_s(fake("TPU v5p")) == 459e12
  assert peak_flops_per_s(fake("TPU v4")) == 275e12
  assert peak_flops_per_s(jax.devices("cpu")[0]) is None
  cfg = ModelConfig()
  assert mfu(1000.0, cfg, 128, jax.devices("cpu")[0]) is None
  tps = 0.5 * 989e12 / flops_per_token(cfg, 128)  # half the peak
  assert mfu(tps, cfg, 128, fake("NVIDIA H100 80GB HBM3")) == pytest.approx(0.5)
  assert mfu(tps, cfg, 128, fake("NVIDIA H100 80GB HBM3"), num_devices=2) == pytest.approx(0.25)

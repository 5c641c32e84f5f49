"""tp_collectives="xla" | "pallas" (Megatron sequence-parallel blocks under shard_map) against
the gspmd path: loss, logits and gradients. "pallas" runs the TPU interpreter on CPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import DecoderLM, ModelConfig
from models.loss import cross_entropy
from models.sharding import batch_sharding, make_mesh, shard_params


def _setup(num_layers=2, num_kv_heads=2, batch=4, seq=9):
  cfg = dataclasses.replace(ModelConfig(), d_model=32, num_heads=4, num_kv_heads=num_kv_heads,
                            num_layers=num_layers, max_seq_len=16, tie_embeddings=False)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, 256)
  params = DecoderLM(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]
  return cfg, params, tokens


def _loss_and_grads(cfg, segment_ids=None):
  model = DecoderLM(cfg)

  def loss(p, t):
    logits = model.apply({"params": p}, t[:, :-1], segment_ids=segment_ids)
    return cross_entropy(logits, t[:, 1:])[0], logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _run(cfg, params, tokens, mesh, impl, segment_ids=None):
  c = dataclasses.replace(cfg, tp_collectives=impl)
  with jax.set_mesh(mesh):
    (loss, logits), grads = _loss_and_grads(c, segment_ids)(
        shard_params(params, mesh, c), jax.device_put(tokens, batch_sharding(mesh)))
  return jax.device_get((loss, logits, grads))


def _err(a, b):
  """max |a - b| over a pytree, relative to max |b| (>= 1e-3)."""
  errs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(1e-3, np.max(np.abs(y))))
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(errs)


def _check(got, want, tol=1e-5):
  (gl, glog, gg), (wl, wlog, wg) = got, want
  assert abs(float(gl) - float(wl)) <= 1e-6 * abs(float(wl))
  assert _err(glog, wlog) <= tol
  assert jax.tree.structure(gg) == jax.tree.structure(wg)
  assert _err(gg, wg) <= tol  # f32: only the order of the sums over heads / F differs


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sequence_parallel_equals_gspmd_data2_tensor2(devices, impl):
  """GQA (4 heads, 2 kv heads), mesh data=2 x tensor=2: loss, logits and every gradient."""
  cfg, params, tokens = _setup(num_layers=2 if impl == "xla" else 1)
  mesh = make_mesh(devices, data=2, tensor=2)
  want = _run(cfg, params, tokens, mesh, "gspmd")
  got = _run(cfg, params, tokens, mesh, impl)
  _check(got, want)
  if impl == "xla":  # packed sequences: segment ids reach attention on every device
    seg = jnp.asarray(np.repeat([[1, 1, 1, 2, 2, 2, 2, 3]], 4, 0), jnp.int32)
    _check(_run(cfg, params, tokens, mesh, impl, seg),
           _run(cfg, params, tokens, mesh, "gspmd", seg))


def test_sequence_parallel_pallas_tensor4_equals_xla_and_gspmd(devices):
  cfg, params, tokens = _setup(num_layers=1, num_kv_heads=4, batch=2)
  mesh = make_mesh(devices, data=1, tensor=4)
  want = _run(cfg, params, tokens, mesh, "gspmd")
  xla = _run(cfg, params, tokens, mesh, "xla")
  pallas = _run(cfg, params, tokens, mesh, "pallas")
  _check(xla, want)
  _check(pallas, want)
  _check(pallas, xla)


def test_init_and_errors(devices):
  cfg, params, tokens = _setup(num_layers=1)
  tp = dataclasses.replace(cfg, tp_collectives="pallas")
  same = DecoderLM(tp).init(jax.random.key(0), tokens[:, :-1])["params"]  # no mesh needed
  assert _err(same, params) == 0.0
  with pytest.raises(ValueError, match=r"tp_collectives='nccl' is not allowed.*'gspmd', 'xla', "
                                       r"'pallas'"):
    dataclasses.replace(cfg, tp_collectives="nccl")
  with pytest.raises(ValueError, match="dropout_rate"):
    dataclasses.replace(tp, dropout_rate=0.1)
  x = tokens[:, :-1]
  with pytest.raises(ValueError, match=r"jax.set_mesh"):
    DecoderLM(tp).apply({"params": params}, x)
  with jax.set_mesh(make_mesh(devices, tensor=4)):
    with pytest.raises(ValueError, match=r"num_kv_heads=2 must be divisible by the mesh's "
                                         r"'tensor' size 4"):
      DecoderLM(tp).apply({"params": params}, x)
  with jax.set_mesh(make_mesh(devices, data=2, tensor=2)):
    with pytest.raises(ValueError, match=r"sequence length=7 must be divisible"):
      DecoderLM(tp).apply({"params": params}, x[:, :7])

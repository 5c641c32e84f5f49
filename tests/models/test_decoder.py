"""DecoderLM vs the plain-jnp reference, and the properties a causal LM must have."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import DecoderLM, ModelConfig, cross_entropy, param_count, reference

B, L = 2, 8


def tiny(**kw):
  """The default config, shrunk."""
  shrunk = dict(d_model=32, num_heads=4, num_kv_heads=4, num_layers=1, max_seq_len=16)
  return dataclasses.replace(ModelConfig(), **{**shrunk, **kw})


def init(cfg, seed=0):
  tokens = jax.random.randint(jax.random.key(seed + 100), (B, L), 0, 256)
  params = DecoderLM(cfg).init(jax.random.key(seed), tokens)["params"]
  return params, tokens


def apply_fn(cfg, **kw):
  return jax.jit(lambda p, t, s=None: DecoderLM(cfg).apply({"params": p}, t, segment_ids=s, **kw))


def loss_fn(logits_fn):
  def f(p, tokens, seg):
    return cross_entropy(logits_fn(p, tokens, seg)[:, :-1], tokens[:, 1:])[0]
  return f


def assert_tree_close(a, b, rtol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    scale = float(np.max(np.abs(y)))
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("cfg_kw, segmented", [
    (dict(num_layers=1), False),
    (dict(num_layers=2, num_kv_heads=2, tie_embeddings=False), True),
])
def test_forward_and_grad_match_reference(cfg_kw, segmented):
  cfg = tiny(**cfg_kw)
  params, tokens = init(cfg)
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 2, 3]]) if segmented else None
  model_logits = lambda p, t, s: DecoderLM(cfg).apply({"params": p}, t, segment_ids=s)
  ref_logits = lambda p, t, s: reference.forward(p, t, cfg, segment_ids=s)
  got = jax.jit(model_logits)(params, tokens, seg)
  want = jax.jit(ref_logits)(params, tokens, seg)
  assert got.dtype == jnp.float32 and got.shape == (B, L, cfg.vocab_size)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  g_got = jax.jit(jax.grad(loss_fn(model_logits)))(params, tokens, seg)
  g_want = jax.jit(jax.grad(loss_fn(ref_logits)))(params, tokens, seg)
  assert_tree_close(g_got, g_want, rtol=1e-5)


def test_causal_through_gradients():
  cfg = tiny(num_layers=2)
  params, tokens = init(cfg)
  model = DecoderLM(cfg)
  x = model.apply({"params": params}, tokens, method=DecoderLM.embed_tokens)
  w = jax.random.normal(jax.random.key(3), (B, L, cfg.vocab_size))

  def per_position(x_BxLxD):
    logits = model.apply({"params": params}, x_BxLxD, method=DecoderLM.logits_from_embeddings)
    return jnp.sum(logits * w, axis=(0, 2))  # [L]: a scalar per output position

  jac_LxBxLxD = np.asarray(jax.jit(jax.jacrev(per_position))(x))
  dep_LxL = np.abs(jac_LxBxLxD).max(axis=(1, 3))  # [out position t, input position s]
  future = np.triu(np.ones((L, L), bool), k=1)
  assert np.all(dep_LxL[future] == 0.0)  # exactly zero, not just small
  assert np.all(dep_LxL[~future] > 0.0)  # and every past/current input matters


def test_future_token_leaves_past_logits_unchanged():
  cfg = tiny()
  params, tokens = init(cfg)
  f = apply_fn(cfg)
  t0 = 5
  changed = tokens.at[:, t0].set((tokens[:, t0] + 1) % 256)
  a, b = f(params, tokens), f(params, changed)
  np.testing.assert_allclose(a[:, :t0], b[:, :t0], rtol=0, atol=1e-6)
  assert np.all(np.abs(a[:, t0:] - b[:, t0:]).max(axis=-1) > 1e-6)


def test_segments_are_isolated_and_positions_reset():
  cfg = tiny()
  params, tokens = init(cfg)
  f = apply_fn(cfg)
  seg = jnp.array([[1] * 5 + [2] * 3] * B)
  other = tokens.at[:, 5:].set((tokens[:, 5:] + 7) % 256)
  a, b = f(params, tokens, seg), f(params, other, seg)
  np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
  # segment 2 behaves as a fresh sequence starting at position 0
  alone = f(params, tokens[:, 5:])
  np.testing.assert_allclose(a[:, 5:], alone, rtol=1e-5, atol=1e-6)
  assert np.abs(f(params, tokens)[:, 5:] - alone).max() > 1e-4  # unsegmented differs


def test_gqa_equals_mha_with_repeated_kv():
  gqa = tiny(num_kv_heads=2)
  mha = tiny(num_kv_heads=4)
  p_gqa, tokens = init(gqa)
  groups = mha.num_heads // gqa.num_kv_heads
  p_mha = jax.tree_util.tree_map(lambda x: x, p_gqa)
  for name in ("k", "v"):
    kern = p_gqa["blocks_0"]["attn"][name]["kernel"]  # [D, K, E]
    p_mha["blocks_0"]["attn"][name] = {"kernel": jnp.repeat(kern, groups, axis=1)}
  ref_shapes = jax.eval_shape(DecoderLM(mha).init, jax.random.key(0), tokens)["params"]
  assert jax.tree_util.tree_map(jnp.shape, p_mha) == jax.tree_util.tree_map(lambda s: s.shape, ref_shapes)
  np.testing.assert_allclose(apply_fn(gqa)(p_gqa, tokens), apply_fn(mha)(p_mha, tokens),
                             rtol=1e-5, atol=1e-6)


def test_tied_vs_untied_param_count():
  tokens = jnp.zeros((1, 4), jnp.int32)
  count = lambda cfg: param_count(jax.eval_shape(DecoderLM(cfg).init, jax.random.key(0), tokens))
  tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
  assert count(untied) - count(tied) == tied.vocab_size * tied.d_model


def test_bf16_compute_close_to_f32():
  cfg32 = tiny(num_layers=2)
  cfg16 = dataclasses.replace(cfg32, compute_dtype="bfloat16")
  params, tokens = init(cfg32)
  a = apply_fn(cfg32)(params, tokens)
  b = apply_fn(cfg16)(params, tokens)
  assert b.dtype == jnp.float32
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert 0 < rel < 2e-2, rel
  p16 = DecoderLM(dataclasses.replace(cfg16, param_dtype="bfloat16")).init(jax.random.key(0), tokens)
  assert {x.dtype for x in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_embedding_gradient_of_a_frequent_token_is_summed_in_f32(param_dtype):
  # A token repeated at all 8192 positions: its row's gradient is the sum of 8192 cotangents.
  # Summed in bf16 (a bf16 scatter-add: flax Embed's backward under bf16 compute) the running
  # sum keeps 8 bits, so it stalls; in f32 it matches the exact sum of the bf16 cotangents.
  cfg = tiny(compute_dtype="bfloat16", param_dtype=param_dtype)
  params, _ = init(cfg)
  tokens = jnp.full((8, 1024), 7, jnp.int32)
  w = jax.random.uniform(jax.random.key(1), (8, 1024, cfg.d_model), minval=0.5, maxval=1.5)

  def f(p):
    x = DecoderLM(cfg).apply({"params": p}, tokens, method=DecoderLM.embed_tokens)
    assert x.dtype == jnp.bfloat16
    return jnp.sum(x.astype(jnp.float32) * w)

  g = jax.jit(jax.grad(f))(params)["embed"]["embedding"]
  assert g.dtype == jnp.dtype(param_dtype)
  exact = np.asarray(w.astype(jnp.bfloat16), np.float64).sum(axis=(0, 1))
  got = np.asarray(g[7], np.float64)
  rtol = 1e-5 if param_dtype == "float32" else 8e-3     # the last rounding: to the param dtype
  np.testing.assert_allclose(got, exact, rtol=rtol)
  assert np.all(np.delete(np.asarray(g, np.float32), 7, axis=0) == 0)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_grads(remat):
  cfg = tiny(num_layers=2)
  params, tokens = init(cfg)
  def grads(c):
    logits = lambda p, t, s: DecoderLM(c).apply({"params": p}, t, segment_ids=s)
    return jax.jit(jax.grad(loss_fn(logits)))(params, tokens, None)
  assert_tree_close(grads(dataclasses.replace(cfg, remat=remat)), grads(cfg), rtol=1e-6)


def test_dropout_only_when_not_deterministic():
  cfg = tiny(dropout_rate=0.5)
  params, tokens = init(cfg)
  base = apply_fn(tiny())(params, tokens)
  np.testing.assert_array_equal(apply_fn(cfg)(params, tokens), base)
  train = jax.jit(lambda p, t, k: DecoderLM(cfg).apply(
      {"params": p}, t, deterministic=False, rngs={"dropout": k}))
  a, b = train(params, tokens, jax.random.key(1)), train(params, tokens, jax.random.key(2))
  assert np.abs(a - base).max() > 1e-3 and np.abs(a - b).max() > 1e-3

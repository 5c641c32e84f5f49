"""The token embedding's forward + backward, three ways, on three token distributions.

  python launch/bench_embedding.py --out=embedding.json               # 16 x 1024, D 768, V 259
  JAX_PLATFORMS=cpu python launch/bench_embedding.py --batch=2 --seq=64 --d_model=32 --iters=2

Each way maps token ids [B, L] to bf16 embeddings [B, L, D] from an f32 table [V, D] and is
timed as the jitted gradient of sum(embeddings * w) with respect to the table, which is
what a train step pays for its embedding:
  model       DecoderLM.embed_tokens (models/decoder.py): gather from the f32 table, then cast;
              the backward is an f32 scatter-add;
  bf16_table  flax nn.Embed(dtype=bf16), what the model did before: gather from the table
              cast to bf16; the backward is a bf16 scatter-add;
  one_hot     one_hot(tokens) @ table in bf16: a matmul, no scatter, V x more FLOPs.
Tokens: `random` (uniform byte ids), `corpus` (the stdlib corpus' first batch, where a space
is ~30% of the bytes), `one_token` (every position the same id). On GPU a scatter-add's
atomic adds serialize on the rows of frequent tokens, so its time depends on the tokens;
in bf16 the running sum of a frequent row also stalls, which `rel_err` shows: the largest
error of the table's gradient against the exact float64 sum of the cotangents, relative to
the largest exact value. Times: median ms of --iters calls after one compile call.
One H100 (jax 0.11.2) timed whole 125M train steps with these three embeddings
(launch/results/diloco_inner_step_h100/embedding_scatter_data.json): bf16_table 36 / 58 /
86 ms on random / corpus / one token, model and one_hot 35-36 ms on all three.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_B = flags.DEFINE_integer("batch", 16, "B: sequences per batch.")
_L = flags.DEFINE_integer("seq", 1024, "L: tokens per sequence.")
_D = flags.DEFINE_integer("d_model", 768, "D: embedding width.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per (way, tokens).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")

WAYS = ("model", "bf16_table", "one_hot")
TOKENS = ("random", "corpus", "one_token")


def token_batches(B: int, L: int) -> dict:
  """{distribution: int32 [B, L] token ids}."""
  import numpy as np
  from configs import base
  from pathways_lite import data as data_lib
  cfg = base.get_config().data
  cfg.seq_len = L - 1                         # a corpus batch is [B, seq_len + 1]
  one = {t: data_lib.benchmark_batches(cfg, 1, batch_size=B, tokens=t)[0]
         for t in data_lib.BENCH_TOKENS}
  return {"random": one["random"], "corpus": one["corpus"],
          "one_token": np.full((B, L), 32, np.int32)}


def embed_fns(V: int, D: int) -> dict:
  """{way: f(table [V, D] f32, tokens [B, L]) -> bf16 [B, L, D]}."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from models import DecoderLM, ModelConfig

  cfg = dataclasses.replace(ModelConfig(), vocab_size=V, d_model=D, num_heads=1, num_kv_heads=1,
                            compute_dtype="bfloat16")
  model = DecoderLM(cfg)
  flax_embed = nn.Embed(V, D, dtype=jnp.bfloat16)
  return {
      "model": lambda t, x: model.apply({"params": {"embed": {"embedding": t}}}, x,
                                        method=DecoderLM.embed_tokens),
      "bf16_table": lambda t, x: flax_embed.apply({"params": {"embedding": t}}, x),
      "one_hot": lambda t, x: jnp.einsum("blv,vd->bld", jax.nn.one_hot(x, V, dtype=jnp.bfloat16),
                                         t.astype(jnp.bfloat16)),
  }


def measure(B: int, L: int, D: int, iters: int, V: int = 259) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  table = jax.random.normal(jax.random.key(0), (V, D), jnp.float32) * 0.02
  w = jax.random.uniform(jax.random.key(1), (B, L, D), minval=0.5, maxval=1.5)
  w16 = np.asarray(w.astype(jnp.bfloat16), np.float64)      # the cotangent the table sees
  out = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
         "batch": B, "seq": L, "d_model": D, "vocab": V, "iters": iters, "ms": {}, "rel_err": {}}
  for tname, tokens in token_batches(B, L).items():
    exact = np.zeros((V, D))
    np.add.at(exact, np.asarray(tokens).ravel(), w16.reshape(-1, D))
    x = jax.device_put(tokens)
    for way, fn in embed_fns(V, D).items():
      # tokens and cotangents are arguments, not constants: XLA would fold the whole gradient
      grad = jax.jit(jax.grad(lambda t, x, w, fn=fn: jnp.sum(fn(t, x).astype(jnp.float32) * w)))
      g = np.asarray(jax.block_until_ready(grad(table, x, w)), np.float64)
      times = []
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(table, x, w))
        times.append(1e3 * (time.perf_counter() - t0))
      key = f"{way}/{tname}"
      out["ms"][key] = statistics.median(times)
      out["rel_err"][key] = float(np.max(np.abs(g - exact)) / np.max(np.abs(exact)))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if min(_B.value, _D.value, _ITERS.value) < 1 or _L.value < 2:
    raise app.UsageError("--batch, --d_model and --iters must be >= 1 and --seq >= 2 (a corpus "
                         f"batch of --seq tokens), got {_B.value}, {_D.value}, {_ITERS.value}, "
                         f"{_L.value}")
  from pathways_lite.metrics import emit_json
  emit_json(measure(_B.value, _L.value, _D.value, _ITERS.value), _OUT.value)


if __name__ == "__main__":
  app.run(main)

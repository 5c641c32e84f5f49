"""pathways_lite.data: tokenizer, corpus cache, split, shards, iterators, errors."""
import json
import os

import numpy as np
import pytest

from pathways_lite import data
from tests.data.small_corpus import make_small_corpus


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return make_small_corpus(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def corpus(source, tmp_path_factory):
  return data.open_corpus((source,), str(tmp_path_factory.mktemp("cache")))


def test_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  text = "def f(x):\n    return 'héllo ✓'  # ünïcode\n"
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert ids.dtype == np.int32 and ids[1:-1].max() < 256
  assert tok.decode(ids) == text
  assert tok.decode(np.r_[ids, tok.pad_id, tok.pad_id]) == text
  assert {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258} and tok.vocab_size == 259


def test_documents_are_bos_bytes_eos(corpus, source):
  files = data.resolve_sources((source,))
  assert [f.name for f in files] == corpus.doc_names
  for i in (0, corpus.num_docs // 2, corpus.num_docs - 1):
    with open(files[i].path, "rb") as fh:
      raw = np.frombuffer(fh.read(), np.uint8)
    doc = corpus.document(i)
    assert doc[0] == data.BOS_ID and doc[-1] == data.EOS_ID
    np.testing.assert_array_equal(doc[1:-1], raw)
  assert corpus.num_tokens == sum(os.path.getsize(f.path) + 2 for f in files)
  assert set(corpus.doc_groups) == {"json", "collections", "importlib", "logging", "textwrap",
                                    "shlex", "colorsys", "bisect"}


def test_cache_built_once_then_reused_and_invalidated(source, tmp_path):
  cache = str(tmp_path / "cache")
  before = data.BUILD_COUNT
  c1 = data.open_corpus((source,), cache)
  index = os.path.join(c1.path, "index.json")
  mtime = os.stat(index).st_mtime_ns
  c2 = data.open_corpus((source,), cache)
  assert data.BUILD_COUNT == before + 1  # the second open did not re-tokenize
  assert c2.path == c1.path and os.stat(index).st_mtime_ns == mtime
  assert sorted(os.listdir(cache)) == [os.path.basename(c1.path)]  # no temp dirs left
  # A changed source file gives a new fingerprint, hence a new cache.
  src_root = os.path.dirname(os.path.dirname(source))
  changed = os.path.join(src_root, "bisect.py")
  text = open(changed).read()
  try:
    with open(changed, "a") as fh:
      fh.write("\n# changed\n")
    c3 = data.open_corpus((source,), cache)
    assert data.BUILD_COUNT == before + 2 and c3.path != c1.path
    assert c3.num_tokens == c1.num_tokens + len("\n# changed\n")
  finally:
    with open(changed, "w") as fh:
      fh.write(text)


def test_killed_build_leaves_no_cache(source, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  calls = []

  def dying_read(path):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt  # as if the process were killed mid-build
    with open(path, "rb") as fh:
      return fh.read()

  monkeypatch.setattr(data, "_read_bytes", dying_read)
  with pytest.raises(KeyboardInterrupt):
    data.open_corpus((source,), str(cache))
  assert os.listdir(cache) == []
  monkeypatch.undo()
  assert data.open_corpus((source,), str(cache)).num_docs > 3


def test_split_is_deterministic_disjoint_and_covering(corpus):
  train, val = data.split_documents(corpus, 0.1)
  train2, val2 = data.split_documents(corpus, 0.1)
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(val, val2)
  assert len(val) == round(0.1 * corpus.num_docs)
  assert not set(train) & set(val)
  assert sorted([*train, *val]) == list(range(corpus.num_docs))


@pytest.mark.parametrize("split", ["iid", "non_iid"])
def test_shards_partition_training_documents(corpus, split):
  train, _ = data.split_documents(corpus, 0.1)
  shards = data.make_shards(corpus, train, 3, split, seed=0)
  ids = [set(s.doc_ids.tolist()) for s in shards]
  assert all(ids) and sum(len(s) for s in ids) == len(train)
  assert set().union(*ids) == set(train.tolist())
  lengths = corpus.doc_lengths
  total = int(lengths[train].sum())
  for s in shards:
    assert s.num_tokens == int(lengths[s.doc_ids].sum())
    assert s.weight == pytest.approx(s.num_tokens / total)
  assert sum(s.weight for s in shards) == pytest.approx(1.0)
  if split == "non_iid":  # each module lives on exactly one worker
    groups = [set(s.groups) for s in shards]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
  else:
    other = data.make_shards(corpus, train, 3, split, seed=1)
    assert any(set(a.doc_ids.tolist()) != set(b.doc_ids.tolist())
               for a, b in zip(shards, other))


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_determinism_and_seeds(corpus):
  train, _ = data.split_documents(corpus, 0.1)
  a = _batches(data.BatchIterator(corpus, train, 4, 32, seed=0), 3)
  b = _batches(data.BatchIterator(corpus, train, 4, 32, seed=0), 3)
  c = _batches(data.BatchIterator(corpus, train, 4, 32, seed=1), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))
  assert a[0].shape == (4, 33) and a[0].dtype == np.int32
  assert a[0].min() >= 0 and a[0].max() < data.BYTE_VOCAB_SIZE


def test_unshuffled_rows_are_the_packed_stream(corpus):
  docs = np.arange(6)
  it = data.BatchIterator(corpus, docs, 2, 15, shuffle=False)
  stream = np.concatenate([corpus.document(int(d)) for d in docs]).astype(np.int32)
  rows = np.concatenate([next(it) for _ in range(it.batches_per_epoch)])
  np.testing.assert_array_equal(rows.reshape(-1), stream[:rows.size])
  assert it.get_state()["epoch"] == 1


def test_exact_resume_across_epochs(corpus):
  docs = np.arange(3)  # a few documents: a short epoch, so resuming crosses epochs
  make = lambda: data.BatchIterator(corpus, docs, 4, 64, seed=7)
  it = make()
  k = it.batches_per_epoch + 2
  _batches(it, k)
  state = json.loads(json.dumps(it.get_state()))
  assert state["epoch"] == 1 and state["position"] == 2 and state["seed"] == 7
  expected = _batches(it, it.batches_per_epoch)
  fresh = make()
  fresh.set_state(state)
  for x, y in zip(expected, _batches(fresh, len(expected))):
    np.testing.assert_array_equal(x, y)
  first = make()  # epochs reshuffle: epoch 1 is not epoch 0 again
  e0 = _batches(first, first.batches_per_epoch)
  e1 = _batches(first, first.batches_per_epoch)
  assert any(not np.array_equal(x, y) for x, y in zip(e0, e1))
  with pytest.raises(ValueError, match="position"):
    make().set_state({"epoch": 0, "position": 10**6, "seed": 0})


def test_load_data_shards_and_validation(source, tmp_path):
  cfg = _data_cfg(source, tmp_path, split="non_iid")
  d = data.load_data(cfg, seed=0, num_workers=2)
  assert len(d.shards) == 2
  assert not set(d.val_doc_ids.tolist()) & set(np.concatenate([s.doc_ids for s in d.shards]))
  v1, v2 = d.validation_batches(3), d.validation_batches(3)
  assert len(v1) == 3 and all(np.array_equal(x, y) for x, y in zip(v1, v2))
  assert d.describe()["shard_tokens"] == [s.num_tokens for s in d.shards]


def test_benchmark_batches_are_the_iterators_first_batches(source, tmp_path):
  cfg = _data_cfg(source, tmp_path)
  got = data.benchmark_batches(cfg, 3, batch_size=2)
  it = data.load_data(_data_cfg(source, tmp_path, batch_size=2)).train_iterator(0)
  assert got.shape == (3, 2, 33) and got.dtype == np.int32
  for b in got:
    np.testing.assert_array_equal(b, next(it))
  assert cfg.batch_size == 4                     # the caller's config is left as it was
  r = data.benchmark_batches(cfg, 2, tokens="random", seed=1)
  assert r.shape == (2, 4, 33) and r.min() >= 0 and r.max() < 256
  np.testing.assert_array_equal(r, data.benchmark_batches(cfg, 2, tokens="random", seed=1))
  with pytest.raises(ValueError, match=r"tokens='zeros' is not one of \['corpus', 'random'\]"):
    data.benchmark_batches(cfg, 1, tokens="zeros")


def _data_cfg(source, tmp_path, **kw):
  import ml_collections
  c = ml_collections.ConfigDict(dict(sources=(source,), seq_len=32, batch_size=4,
                                     val_fraction=0.1, split="iid",
                                     cache_dir=str(tmp_path / "cache")))
  c.update(kw)
  return c


def test_error_glob_matches_nothing(tmp_path):
  (tmp_path / "real.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match=r"data\.sources\[1\].*matches no files"):
    data.resolve_sources((str(tmp_path / "*.py"), str(tmp_path / "nothing" / "*.txt")))


def test_error_unreadable_file(tmp_path):
  (tmp_path / "ok.txt").write_text("fine")
  os.symlink(tmp_path / "gone.txt", tmp_path / "broken.txt")  # dangling: cannot be read
  with pytest.raises(ValueError, match=r"cannot read corpus file .*broken\.txt"):
    data.open_corpus((str(tmp_path / "*.txt"),), str(tmp_path / "cache"))


def test_error_read_failure_names_file(source, tmp_path, monkeypatch):
  def denied(path):
    raise PermissionError(13, "Permission denied", path)
  monkeypatch.setattr(data, "_read_bytes", denied)
  with pytest.raises(ValueError, match=r"cannot read corpus file .*: Permission denied"):
    data.open_corpus((source,), str(tmp_path / "cache"))


def test_error_corpus_smaller_than_a_batch(tmp_path):
  (tmp_path / "a.txt").write_text("tiny " * 10)
  (tmp_path / "b.txt").write_text("text " * 10)
  cfg = _data_cfg(str(tmp_path / "*.txt"), tmp_path, val_fraction=0.5)
  with pytest.raises(ValueError, match=r"fewer than data\.batch_size=4"):
    data.load_data(cfg)


def test_error_too_many_workers_for_groups(source, tmp_path):
  with pytest.raises(ValueError, match=r"outer\.num_workers=50 exceeds .* groups"):
    data.load_data(_data_cfg(source, tmp_path, split="non_iid"), num_workers=50)

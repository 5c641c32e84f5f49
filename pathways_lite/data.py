"""Byte tokenizer, a cached tokenized corpus, train/val split, per-worker shards, batch iterators.

A corpus is a list of text files (config `data.sources`, file globs; empty means
the `.py` files of the running interpreter's standard library). Each file is a
document tokenized as BOS + bytes + EOS. The whole corpus is tokenized once and
cached under `<data.cache_dir or ~/.cache/pathways_lite>/corpus-<fingerprint>/`:

  tokens/      zarr array (TensorStore), uint16 [T]: all documents, concatenated
  index.json   fingerprint, doc names, groups and offsets [N + 1]

The fingerprint hashes the file list with sizes and mtimes, so an edited source
gives a new cache. The cache is written to a temporary directory and renamed,
so a killed build never leaves a half cache. Batches read token ranges from the
zarr array; the corpus is never loaded whole.

Letters: B batch size, L sequence length (a row holds L + 1 tokens: inputs are
row[:, :-1], targets row[:, 1:]), N documents, M workers.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import heapq
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from models.config import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID

FORMAT_VERSION = 1
SPLITS = ("iid", "non_iid")
_CHUNK_TOKENS = 1 << 16
_FLUSH_TOKENS = 1 << 22
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo")
BUILD_COUNT = 0  # number of corpus caches built by this process (tests read it)


class ByteTokenizer:
  """Bytes 0..255 are their own ids; PAD=256, BOS=257, EOS=258; vocab_size 259."""

  pad_id, bos_id, eos_id, vocab_size = PAD_ID, BOS_ID, EOS_ID, BYTE_VOCAB_SIZE

  def encode(self, text: str | bytes, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, np.uint8).astype(np.int32)
    head = [self.bos_id] if add_bos else []
    tail = [self.eos_id] if add_eos else []
    return np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])

  def decode(self, ids) -> str:
    """Drops special ids; invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


# ---- sources ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceFile:
  path: str   # as found on this machine
  name: str   # stable document name (relative to its source root): keys the val split
  group: str  # top-level module / first directory: the non-iid unit


def default_sources() -> list[SourceFile]:
  """The `.py` files of the running interpreter's standard library, without tests."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _SKIP_DIRS and not d.startswith("test"))
    for f in filenames:
      if f.endswith(".py") and not f.startswith("test_"):
        rel = os.path.relpath(os.path.join(dirpath, f), root)
        files.append(SourceFile(os.path.join(root, rel), rel, _group_of(rel)))
  return sorted(files, key=lambda s: s.name)


def resolve_sources(sources: Sequence[str]) -> list[SourceFile]:
  """Expands `data.sources` globs (sorted, deduplicated); empty -> default_sources()."""
  if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
    raise ValueError(f"data.sources must be a tuple of file globs, got {sources!r}")
  if not sources:
    files = default_sources()
    if not files:
      raise ValueError("data.sources is empty and the default corpus (the standard library "
                       f"under {sysconfig.get_paths()['stdlib']}) has no .py files; "
                       "give data.sources")
    return files
  files, seen = [], set()
  for i, pattern in enumerate(sources):
    if not isinstance(pattern, str) or not pattern:
      raise ValueError(f"data.sources[{i}]={pattern!r} must be a non-empty file glob")
    expanded = os.path.expanduser(pattern)
    matches = [m for m in sorted(glob.glob(expanded, recursive=True)) if not os.path.isdir(m)]
    if not matches:
      raise ValueError(f"data.sources[{i}]={pattern!r} matches no files; give globs of text "
                       "files such as 'docs/**/*.md' (empty data.sources = the stdlib)")
    base = _static_prefix(expanded) if glob.has_magic(expanded) else os.path.dirname(expanded)
    for m in matches:
      key = os.path.realpath(m)
      if key not in seen:
        seen.add(key)
        rel = os.path.relpath(m, base) if base else m
        files.append(SourceFile(m, rel, _group_of(rel)))
  return files


def _static_prefix(pattern: str) -> str:
  parts = pattern.split(os.sep)
  keep = []
  for p in parts[:-1]:
    if glob.has_magic(p):
      break
    keep.append(p)
  return os.sep.join(keep) or ("/" if pattern.startswith("/") else "")


def _group_of(rel: str) -> str:
  first = rel.split(os.sep)[0]
  return first[:-3] if first.endswith(".py") else first


def _stat(f: SourceFile) -> os.stat_result:
  try:
    return os.stat(f.path)
  except OSError as e:
    raise ValueError(f"cannot read corpus file {f.path}: {e.strerror}") from e


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as fh:
    return fh.read()


def fingerprint(files: Sequence[SourceFile]) -> str:
  entries = []
  for f in files:
    st = _stat(f)
    entries.append([f.path, f.name, f.group, st.st_size, st.st_mtime_ns])
  blob = json.dumps({"version": FORMAT_VERSION, "files": entries}).encode()
  return hashlib.sha256(blob).hexdigest()


# ---- the cached corpus ------------------------------------------------------

class Corpus:
  """A built corpus cache: document index in memory, tokens read by range."""

  def __init__(self, path: str):
    self.path = path
    with open(os.path.join(path, "index.json")) as fh:
      index = json.load(fh)
    self.fingerprint = index["fingerprint"]
    self.doc_names: list[str] = index["doc_names"]
    self.doc_groups: list[str] = index["doc_groups"]
    self.doc_offsets = np.asarray(index["doc_offsets"], np.int64)  # [N + 1]
    self.num_tokens = int(self.doc_offsets[-1])
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
    self._tokens = ts.open(_zarr_spec(path), read=True, context=ctx).result()

  @property
  def num_docs(self) -> int:
    return len(self.doc_names)

  @property
  def doc_lengths(self) -> np.ndarray:
    return np.diff(self.doc_offsets)

  def read(self, start: int, stop: int) -> np.ndarray:
    return self._tokens[start:stop].read().result()

  def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Issues every range read at once, then waits for all."""
    futures = [self._tokens[a:b].read() for a, b in ranges]
    return [f.result() for f in futures]

  def document(self, i: int) -> np.ndarray:
    return self.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))


def _zarr_spec(path: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(path, "tokens")}}


def open_corpus(sources: Sequence[str] = (), cache_dir: str = "") -> Corpus:
  """Resolves sources, builds the cache if it is missing or stale, and opens it."""
  files = resolve_sources(sources)
  fp = fingerprint(files)
  root = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "pathways_lite"))
  path = os.path.join(root, f"corpus-{fp[:16]}")
  if not _cache_valid(path, fp):
    _build(files, path, fp)
  return Corpus(path)


def _cache_valid(path: str, fp: str) -> bool:
  try:
    with open(os.path.join(path, "index.json")) as fh:
      return json.load(fh).get("fingerprint") == fp
  except (OSError, ValueError):
    return False


def _build(files: Sequence[SourceFile], path: str, fp: str) -> None:
  global BUILD_COUNT
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  except OSError as e:
    raise ValueError(f"data.cache_dir: cannot create the corpus cache in {parent}: "
                     f"{e.strerror}") from e
  try:
    sizes = [_stat(f).st_size for f in files]
    total = sum(sizes) + 2 * len(files)
    spec = _zarr_spec(tmp) | {"metadata": {"shape": [total], "chunks": [_CHUNK_TOKENS],
                                           "dtype": "<u2"}}
    arr = ts.open(spec, create=True).result()
    offsets, pos, buf, buf_start = [0], 0, [], 0
    for f, size in zip(files, sizes):
      try:
        data = _read_bytes(f.path)
      except OSError as e:
        raise ValueError(f"cannot read corpus file {f.path}: {e.strerror or e}") from e
      if len(data) != size:
        raise ValueError(f"corpus file {f.path} changed while the cache was built; run again")
      doc = np.empty(len(data) + 2, np.uint16)
      doc[0], doc[-1] = BOS_ID, EOS_ID
      doc[1:-1] = np.frombuffer(data, np.uint8)
      buf.append(doc)
      pos += len(doc)
      offsets.append(pos)
      if pos - buf_start >= _FLUSH_TOKENS:
        arr[buf_start:pos].write(np.concatenate(buf)).result()
        buf, buf_start = [], pos
    if buf:
      arr[buf_start:pos].write(np.concatenate(buf)).result()
    index = {"version": FORMAT_VERSION, "fingerprint": fp, "num_tokens": pos,
             "doc_names": [f.name for f in files], "doc_groups": [f.group for f in files],
             "doc_paths": [f.path for f in files], "doc_offsets": offsets}
    with open(os.path.join(tmp, "index.json"), "w") as fh:
      json.dump(index, fh)
    if os.path.exists(path):  # stale or broken: replace it
      shutil.rmtree(path, ignore_errors=True)
    try:
      os.rename(tmp, path)
    except OSError:
      if not _cache_valid(path, fp):  # another process did not win the race either
        raise
    BUILD_COUNT += 1
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ---- split and shards -------------------------------------------------------

def split_documents(corpus: Corpus, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic split by document: the round(val_fraction * N) documents (at least one
  when val_fraction > 0) whose name hashes lowest are validation. Returns sorted ids."""
  if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
      or not 0 <= val_fraction < 1:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
  n = corpus.num_docs
  n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * n)))
  if n_val >= n:
    raise ValueError(f"data.val_fraction={val_fraction} leaves no training documents: the "
                     f"corpus has {n} document(s); add data.sources or lower val_fraction")
  keys = [hashlib.sha256(name.encode()).hexdigest() for name in corpus.doc_names]
  order = sorted(range(n), key=lambda i: (keys[i], i))
  val = np.sort(np.asarray(order[:n_val], np.int64))
  train = np.sort(np.asarray(order[n_val:], np.int64))
  return train, val


@dataclasses.dataclass(frozen=True)
class Shard:
  worker: int
  doc_ids: np.ndarray  # sorted corpus document ids
  num_tokens: int
  weight: float        # num_tokens / tokens of all shards: for weighted averaging
  groups: tuple[str, ...]


def make_shards(corpus: Corpus, doc_ids: np.ndarray, num_workers: int, split: str = "iid",
                seed: int = 0) -> list[Shard]:
  """Partitions doc_ids among workers, balancing tokens.

  iid: documents in a seeded random order, each to the least-loaded worker.
  non_iid: whole groups (top-level modules), largest first, each to the least-loaded
  worker, so workers see different modules.
  """
  if split not in SPLITS:
    raise ValueError(f"data.split={split!r} is not allowed; allowed values: {list(SPLITS)}")
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"outer.num_workers must be an int >= 1, got {num_workers!r}")
  doc_ids = np.asarray(doc_ids, np.int64)
  lengths = corpus.doc_lengths
  if split == "iid":
    rng = np.random.default_rng([seed, 0x5A4D])
    units = [[int(d)] for d in rng.permutation(doc_ids)]
  else:
    by_group: dict[str, list[int]] = {}
    for d in doc_ids:
      by_group.setdefault(corpus.doc_groups[d], []).append(int(d))
    units = sorted(by_group.values(), key=lambda u: (-int(lengths[u].sum()), corpus.doc_groups[u[0]]))
  if len(units) < num_workers:
    what = "documents" if split == "iid" else "groups (top-level modules)"
    raise ValueError(f"outer.num_workers={num_workers} exceeds the {len(units)} training {what} "
                     f"for data.split={split!r}; use fewer workers or more data.sources")
  heap = [(0, w) for w in range(num_workers)]
  assigned: list[list[int]] = [[] for _ in range(num_workers)]
  for unit in units:
    load, w = heapq.heappop(heap)
    assigned[w].extend(unit)
    heapq.heappush(heap, (load + int(lengths[unit].sum()), w))
  total = int(lengths[doc_ids].sum())
  shards = []
  for w, docs in enumerate(assigned):
    ids = np.sort(np.asarray(docs, np.int64))
    tokens = int(lengths[ids].sum())
    groups = tuple(sorted({corpus.doc_groups[d] for d in ids}))
    shards.append(Shard(w, ids, tokens, tokens / total, groups))
  return shards


# ---- iterators --------------------------------------------------------------

class BatchIterator:
  """Packs documents into rows of L + 1 tokens; yields int32 [B, L + 1] batches forever.

  Epoch e (shuffle=True) draws a document order and a row order from
  (seed, stream, e); the tail that does not fill a row, and the rows that do not
  fill a batch, are dropped for that epoch. State = (epoch, position in epoch),
  so `set_state(get_state())` on a fresh iterator yields bitwise the same batches.
  """

  def __init__(self, corpus: Corpus, doc_ids, batch_size: int, seq_len: int, seed: int = 0,
               shuffle: bool = True, stream: int = 0, name: str = "training data"):
    for field, v in (("data.batch_size", batch_size), ("data.seq_len", seq_len)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{field} must be an int >= 1, got {v!r}")
    self.corpus, self.batch_size, self.seq_len = corpus, batch_size, seq_len
    self.seed, self.shuffle, self.stream = int(seed), shuffle, int(stream)
    self.doc_ids = np.asarray(doc_ids, np.int64)
    self._lengths = corpus.doc_lengths[self.doc_ids]
    self.num_tokens = int(self._lengths.sum())
    self.num_rows = self.num_tokens // (seq_len + 1)
    if self.num_rows < batch_size:
      raise ValueError(
          f"{name}: {len(self.doc_ids)} document(s), {self.num_tokens} tokens make "
          f"{self.num_rows} row(s) of data.seq_len+1={seq_len + 1} tokens, fewer than "
          f"data.batch_size={batch_size}; add data.sources or lower batch_size/seq_len")
    self.batches_per_epoch = self.num_rows // batch_size
    self._epoch, self._position, self._plan_for = 0, 0, None

  def __iter__(self):
    return self

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
            "stream": self.stream}

  def set_state(self, state: dict) -> None:
    for key in ("epoch", "position", "seed"):
      v = state.get(key) if isinstance(state, dict) else None
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"iterator state {key!r} must be an int >= 0, got {state!r}")
    if state["position"] >= self.batches_per_epoch:
      raise ValueError(f"iterator state position={state['position']} is out of range: this "
                       f"iterator has {self.batches_per_epoch} batches per epoch")
    self._epoch, self._position = state["epoch"], state["position"]
    self.seed, self.stream = state["seed"], int(state.get("stream", self.stream))
    self._plan_for = None

  def _plan(self):
    if self._plan_for != (self.seed, self.stream, self._epoch):
      n = len(self.doc_ids)
      if self.shuffle:
        rng = np.random.default_rng([self.seed, self.stream, self._epoch])
        doc_order, row_order = rng.permutation(n), rng.permutation(self.num_rows)
      else:
        doc_order, row_order = np.arange(n), np.arange(self.num_rows)
      docs = self.doc_ids[doc_order]
      self._starts = self.corpus.doc_offsets[docs]            # corpus offset of each doc
      self._ends = np.cumsum(self._lengths[doc_order])        # stream end of each doc
      self._row_order = row_order
      self._plan_for = (self.seed, self.stream, self._epoch)

  def _row_ranges(self, row: int) -> list[tuple[int, int]]:
    width = self.seq_len + 1
    s, e = row * width, (row + 1) * width
    i = int(np.searchsorted(self._ends, s, side="right"))
    ranges = []
    while s < e:
      doc_begin = int(self._ends[i - 1]) if i else 0
      take = min(e, int(self._ends[i])) - s
      start = int(self._starts[i]) + (s - doc_begin)
      ranges.append((start, start + take))
      s += take
      i += 1
    return ranges

  def __next__(self) -> np.ndarray:
    self._plan()
    B = self.batch_size
    rows = self._row_order[self._position * B:(self._position + 1) * B]
    per_row = [self._row_ranges(int(r)) for r in rows]
    pieces = self.corpus.read_many([rg for ranges in per_row for rg in ranges])
    out_BxL1 = np.empty((B, self.seq_len + 1), np.int32)
    k = 0
    for b, ranges in enumerate(per_row):
      out_BxL1[b] = np.concatenate(pieces[k:k + len(ranges)])
      k += len(ranges)
    self._position += 1
    if self._position == self.batches_per_epoch:
      self._epoch, self._position = self._epoch + 1, 0
    return out_BxL1


# ---- everything a run needs -------------------------------------------------

@dataclasses.dataclass
class Data:
  corpus: Corpus
  train_doc_ids: np.ndarray
  val_doc_ids: np.ndarray
  shards: list[Shard]
  batch_size: int
  seq_len: int
  seed: int
  tokenizer: ByteTokenizer = dataclasses.field(default_factory=ByteTokenizer)

  def train_iterator(self, worker: int = 0) -> BatchIterator:
    return BatchIterator(self.corpus, self.shards[worker].doc_ids, self.batch_size,
                         self.seq_len, seed=self.seed, stream=worker,
                         name=f"training shard of worker {worker}")

  def validation_batches(self, num_batches: int) -> list[np.ndarray]:
    """The first min(num_batches, available) batches of the validation split, in order."""
    if len(self.val_doc_ids) == 0:
      raise ValueError("data.val_fraction=0 gives no validation documents; evaluation needs > 0")
    it = BatchIterator(self.corpus, self.val_doc_ids, self.batch_size, self.seq_len,
                       shuffle=False, name="validation split (data.val_fraction)")
    return [next(it) for _ in range(min(num_batches, it.batches_per_epoch))]

  def describe(self) -> dict:
    return {"corpus": self.corpus.path, "num_docs": self.corpus.num_docs,
            "num_tokens": self.corpus.num_tokens,
            "train_docs": len(self.train_doc_ids), "val_docs": len(self.val_doc_ids),
            "shard_tokens": [s.num_tokens for s in self.shards],
            "shard_weights": [s.weight for s in self.shards]}


def load_data(data_cfg, *, seed: int = 0, num_workers: int = 1) -> Data:
  """Builds (or reuses) the corpus cache, splits it and shards the training documents.

  data_cfg: the `data` section of the config (sources, seq_len, batch_size,
  val_fraction, split, cache_dir).
  """
  corpus = open_corpus(tuple(data_cfg.sources), data_cfg.cache_dir)
  train_ids, val_ids = split_documents(corpus, data_cfg.val_fraction)
  shards = make_shards(corpus, train_ids, num_workers, data_cfg.split, seed)
  data = Data(corpus, train_ids, val_ids, shards, data_cfg.batch_size, data_cfg.seq_len, seed)
  for w in range(num_workers):  # every shard must fill a batch: fail now, not mid-run
    data.train_iterator(w)
  return data


BENCH_TOKENS = ("corpus", "random")   # what benchmark_batches draws


def benchmark_batches(data_cfg, n: int, *, batch_size: int | None = None,
                      tokens: str = "corpus", seed: int = 0) -> np.ndarray:
  """n batches for a benchmark's steps, as one host int32 [n, B, L+1] array.

  tokens="corpus": the first n batches of worker 0's training iterator over the config's
  corpus, so the step sees real token frequencies. A step's speed can depend on them: the
  embedding's backward adds the rows of frequent tokens into the same table rows (see
  models/decoder.py), which uniform ids never show. "random": uniform byte ids (0-255).
  batch_size: B (default data_cfg.batch_size).
  """
  if tokens not in BENCH_TOKENS:
    raise ValueError(f"tokens={tokens!r} is not one of {list(BENCH_TOKENS)}")
  B = data_cfg.batch_size if batch_size is None else batch_size
  if tokens == "random":
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, B, data_cfg.seq_len + 1), dtype=np.int32)
  cfg = copy.deepcopy(data_cfg)
  cfg.batch_size = B
  it = load_data(cfg, seed=seed).train_iterator(0)
  return np.stack([np.asarray(next(it), np.int32) for _ in range(n)])

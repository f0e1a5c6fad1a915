"""Text corpus of the mtf_switch tasks: one document per line, no network access ever.

By default the corpus is English text that ships with CPython itself (the pydoc topic pages and the
docstrings of the standard library), materialised once into the cache directory. Gin can name other
files instead:

  mtf_switch.tasks.text_files.paths = ["/data/my_corpus.txt.gz"]

Gin parameters (resolved at first use, i.e. after the gin files are parsed):
  text_files.paths: None (default) for the embedded default corpus, or a list of plain `.txt` /
    gzip `.txt.gz` files with one document per line (`~` is expanded).
  validation_split.fraction: fraction of lines held out as the "validation" split (default 0.01).
  validation_split.min_lines: the held-out fraction is raised so that about this many lines are
    held out (default 300), capped at half of the corpus.

Environment: MTF_SWITCH_CACHE names the cache directory (default ~/.cache/mtf_switch).
"""
import ast
import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import warnings
import zlib

import gin
import tensorflow as tf

GIN_MODULE = "mtf_switch.tasks"
MIN_CHARS = 40  # default corpus: shorter paragraphs are dropped
_LINE_BUFFER = 1 << 16  # lines mixed after the shuffled blocks
_BUCKETS = 1_000_000  # resolution of the hash-based train/validation split
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_RULE = re.compile(r"([*=~^#-])\1{3,}")  # reST heading underlines such as "*****"


def cache_dir() -> str:
  """The cache directory ($MTF_SWITCH_CACHE or ~/.cache/mtf_switch), created if needed."""
  path = os.path.expanduser(os.environ.get("MTF_SWITCH_CACHE") or "~/.cache/mtf_switch")
  os.makedirs(path, exist_ok=True)
  return path


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and os.replace (safe for concurrent writers)."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


# ---------------------------------------------------------------- the embedded default corpus


def _stdlib_sources() -> list:
  """Sorted .py files of the standard library, without site-packages, tests and idlelib."""
  stdlib = sysconfig.get_paths()["stdlib"]
  files = []
  for root, dirs, names in os.walk(stdlib):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
    files += [os.path.join(root, n) for n in names if n.endswith(".py")]
  return sorted(files)


def _docstrings(path: str):
  """Module, class and function docstrings of one source file, parsed with ast (never imported)."""
  try:
    with open(path, "rb") as f, warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. SyntaxWarning for invalid escapes
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, ValueError, UnicodeDecodeError):
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        yield doc


def default_corpus_lines() -> list:
  """The default corpus: one whitespace-normalised paragraph per line, deduplicated, in a fixed
  order (pydoc topics sorted by name, then docstrings of the sorted stdlib files)."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  docs = [topics[k] for k in sorted(topics)]
  for path in _stdlib_sources():
    docs.extend(_docstrings(path))
  lines = {}  # insertion-ordered set
  for doc in docs:
    for paragraph in re.split(r"\n\s*\n", doc):
      line = " ".join(_RULE.sub(" ", paragraph).split())
      if len(line) >= MIN_CHARS:
        lines[line] = None
  return list(lines)


@functools.lru_cache(maxsize=None)
def _default_corpus_file(directory: str) -> str:
  # Keyed by the interpreter and the stdlib listing, so upgrading Python rebuilds the corpus.
  key = hashlib.sha256(json.dumps([
      sys.version, sysconfig.get_paths()["stdlib"],
      [(p, os.path.getsize(p)) for p in _stdlib_sources()]]).encode()).hexdigest()[:16]
  path = os.path.join(directory, f"corpus-py{sys.version_info[0]}{sys.version_info[1]}-{key}.txt")
  if not os.path.exists(path):
    atomic_write(path, "".join(l + "\n" for l in default_corpus_lines()).encode("utf-8"))
  return path


def default_corpus_file() -> str:
  """Path of the materialised default corpus in the cache directory (built on first call)."""
  return _default_corpus_file(cache_dir())


# ---------------------------------------------------------------- gin configuration


@gin.configurable(module=GIN_MODULE)
def text_files(paths=None) -> tuple:
  """Returns the absolute paths of the corpus files.

  Args:
    paths: None (default) for the embedded default corpus, or a list (or one string) of `.txt` /
      `.txt.gz` files with one document per line.
  """
  if paths is None:
    return (default_corpus_file(),)
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = tuple(os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths)
  if not paths:
    raise ValueError(f"{GIN_MODULE}.text_files.paths is empty; set it to None for the default "
                     "corpus or to a list of .txt / .txt.gz files")
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"corpus file {path!r} does not exist: check the gin parameter "
          f"{GIN_MODULE}.text_files.paths (None selects the embedded default corpus)")
  return paths


@gin.configurable(module=GIN_MODULE)
def validation_split(fraction=0.01, min_lines=300) -> tuple:
  """Returns the held-out split settings.

  Args:
    fraction: fraction of the lines held out as the "validation" split (default 0.01).
    min_lines: raise the fraction so that about this many lines are held out (default 300),
      never above half of the corpus.
  """
  return float(fraction), int(min_lines)


# ---------------------------------------------------------------- the resolved corpus

_file_stats = {}  # (path, size, mtime_ns) -> (sha256, number of non-empty lines)
# A corpus file is refused as not text when more than this fraction of its bytes are not
# UTF-8 or are control characters (tab, newline and carriage return are text). GCIDE's few
# cp1252 bytes are 1e-7 of it; random bytes are about half.
MAX_NOT_TEXT_FRACTION = 0.01
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, surrogate-escaped


def _open(path):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _count_lines(path: str) -> int:
  """Non-empty lines of a corpus file; raises ValueError if the file is not text."""
  num_lines = size = undecodable = control = 0
  first = None  # line number of the first line that is not text
  try:
    with _open(path) as f:
      for number, line in enumerate(f, 1):
        size += len(line)
        num_lines += bool(line.strip())
        bad = len(_CONTROL.findall(line))
        control += bad
        try:
          line.decode("utf-8")
        except UnicodeDecodeError:
          found = len(_UNDECODABLE.findall(line.decode("utf-8", "surrogateescape")))
          undecodable += found
          bad += found
        if bad and first is None:
          first = number
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"corpus file {path!r} ends in .gz but is not a complete gzip file ({e}): "
                     "compress it with gzip, or drop the .gz for plain text "
                     f"(gin: {GIN_MODULE}.text_files.paths)") from None
  if undecodable + control > MAX_NOT_TEXT_FRACTION * size:
    with open(path, "rb") as f:
      gzipped = f.read(2) == b"\x1f\x8b"
    raise ValueError(
        f"corpus file {path!r} is not text: {undecodable} of its {size} bytes are not UTF-8 "
        f"and {control} are control characters ({(undecodable + control) / size:.1%}, over "
        f"the {MAX_NOT_TEXT_FRACTION:.0%} allowed; the first in line {first})."
        + (" It is gzip-compressed: name it .txt.gz." if gzipped and not path.endswith(".gz")
           else "") +
        " The corpus must be UTF-8 text (convert others, e.g. `iconv -f cp1252 -t utf-8`), "
        "one document per line "
        f"(gin: {GIN_MODULE}.text_files.paths).")
  return num_lines


def _file_stat(path: str) -> tuple:
  st = os.stat(path)
  key = (path, st.st_size, st.st_mtime_ns)
  if key not in _file_stats:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    _file_stats[key] = (digest.hexdigest(), _count_lines(path))
  return _file_stats[key]


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A resolved corpus: its files, size, split threshold and fingerprint (for cache keys)."""
  files: tuple
  num_lines: int
  # A line is held out iff hash_bucket(line) < validation_buckets: one threshold for all files,
  # or a tuple of one per file (tasks/domains.py holds out 1% of GCIDE and 2% of kernel-docs).
  validation_buckets: object
  fingerprint: str

  def dataset(self, split: str, shuffle: bool = False, seed=None) -> tf.data.Dataset:
    """The lines of `split` ("train" or "validation") as a dataset of tf.string scalars.

    The split is a stable hash of the line, so identical lines stay together. Lines come in file
    order, or with `shuffle` in blocks of 1024 consecutive lines in shuffled order and then
    through a buffer of 65,536 lines (the corpus files are sorted by topic and seqio's own buffer
    holds only 1,000 examples: with blocks alone, 18% of the batches of 16 of the two-domain
    corpus held no kernel-docs line and the kernel-docs share of 500-step windows ranged from 14%
    to 45%; with the line buffer 0% and 23-30%)."""
    if split not in ("train", "validation"):
      raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    per_file = isinstance(self.validation_buckets, (tuple, list))
    if per_file and len(self.validation_buckets) != len(self.files):
      raise ValueError(f"{len(self.validation_buckets)} validation thresholds for "
                       f"{len(self.files)} files")
    ds = None
    for index, path in enumerate(self.files):
      d = tf.data.TextLineDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
      if per_file:  # each line carries its file's threshold
        d = d.map(lambda s, b=int(self.validation_buckets[index]): (s, tf.constant(b, tf.int64)))
      ds = d if ds is None else ds.concatenate(d)
    held_out = split == "validation"

    def select(lines, buckets=self.validation_buckets):  # vectorised over a batch of lines
      # Invalid UTF-8 (gcide has a few cp1252 bytes) would break the tokenizer: replace it.
      lines = tf.strings.strip(tf.strings.unicode_transcode(
          lines, "UTF-8", "UTF-8", errors="replace"))
      in_validation = tf.strings.to_hash_bucket_fast(lines, _BUCKETS) < buckets
      return tf.boolean_mask(lines, (tf.strings.length(lines) > 0)
                             & tf.equal(in_validation, held_out))

    # Blocks of 1024 consecutive lines (across file boundaries, as with one threshold).
    ds = ds.batch(1024)
    if shuffle:
      ds = ds.shuffle(1024, seed=seed)
    ds = ds.map(select).unbatch()
    return ds.shuffle(_LINE_BUFFER, seed=seed) if shuffle else ds

  def lines(self, split: str) -> list:
    """The lines of `split` as Python strings.

    Runs in its own graph and session: t5_mesh_transformer disables eager execution, so
    as_numpy_iterator() is not available there."""
    lines = []
    with tf.Graph().as_default():
      batch = tf.compat.v1.data.make_one_shot_iterator(self.dataset(split).batch(4096)).get_next()
      with tf.compat.v1.Session() as session:
        while True:
          try:
            lines.extend(s.decode("utf-8") for s in session.run(batch))
          except tf.errors.OutOfRangeError:
            return lines


def corpus() -> Corpus:
  """Resolves the gin-configured corpus (cheap after the first call for the same files)."""
  files = text_files()
  stats = [_file_stat(p) for p in files]
  num_lines = sum(n for _, n in stats)
  fraction, min_lines = validation_split()
  fraction = max(fraction, min(min_lines / max(num_lines, 1), 0.5))
  buckets = int(round(fraction * _BUCKETS))
  fingerprint = hashlib.sha256(json.dumps([[d for d, _ in stats], buckets]).encode()).hexdigest()
  return Corpus(files, num_lines, buckets, fingerprint)

"""Tests of mtf_switch.tasks: the embedded corpus, the lazily trained vocabulary and the
span-corruption task. No network; the cache goes to a per-session temporary directory."""
import copy
import gzip
import os
import pickle
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio

from conftest import numpy_examples
import mtf_switch.tasks as tasks  # importing must not touch the cache (test_import_is_lazy)
from mtf_switch.tasks import corpus as corpus_lib
from mtf_switch.tasks import vocab as vocab_lib

EXTRA = vocab_lib.EXTRA_IDS


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("mtf_switch_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MTF_SWITCH_CACHE", str(path))
    yield path


@pytest.fixture(scope="session")
def custom_files(tmp_path_factory, cache_dir):
  """A plain and a gzip file with disjoint slices of the default corpus (+ one invalid UTF-8 line)."""
  del cache_dir  # the default corpus must be materialised in the temporary cache
  with open(corpus_lib.default_corpus_file(), encoding="utf-8") as f:
    lines = f.read().splitlines()
  d = tmp_path_factory.mktemp("custom")
  plain, gz = d / "a.txt", d / "b.txt.gz"
  plain.write_bytes("\n".join(lines[:1500]).encode() + b"\n  \ncaf\xe9 latin-1 bytes are replaced\n")
  with gzip.open(gz, "wb") as f:
    f.write("\n".join(lines[1500:3000]).encode() + b"\n")
  expected = lines[:3000] + ["caf\ufffd latin-1 bytes are replaced"]
  return str(plain), str(gz), expected


def use_custom(files):
  gin.parse_config(f"""
      mtf_switch.tasks.text_files.paths = {list(files[:2])!r}
      mtf_switch.tasks.sentencepiece_model.vocab_size = 1000
  """)


def test_import_is_lazy(tmp_path):
  """The task is registered at import (and re-import) without building a corpus or a vocab."""
  cache = tmp_path / "cache"
  code = ("import importlib, seqio, mtf_switch.tasks as t; importlib.reload(t); "
          "assert t.DEFAULT_TASK in seqio.TaskRegistry.names(); str(t.VOCABULARY)")
  env = dict(os.environ, MTF_SWITCH_CACHE=str(cache))
  subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                 capture_output=True)
  assert not cache.exists() or not os.listdir(cache)


def test_default_corpus_is_deterministic(cache_dir):
  lines = corpus_lib.default_corpus_lines()
  assert lines == corpus_lib.default_corpus_lines()
  assert len(lines) > 5000 and len(set(lines)) == len(lines)
  assert all(len(l) >= corpus_lib.MIN_CHARS and "\n" not in l for l in lines)
  path = corpus_lib.default_corpus_file()
  assert os.path.dirname(path) == str(cache_dir)
  with open(path, encoding="utf-8") as f:
    assert f.read().splitlines() == lines
  assert not [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")]


def test_default_split_is_disjoint_and_stable():
  c = corpus_lib.corpus()
  train, validation = c.lines("train"), c.lines("validation")
  assert not set(train) & set(validation)
  assert len(train) + len(validation) == c.num_lines
  assert 250 <= len(validation) <= 0.05 * c.num_lines  # min_lines=300 dominates 1 %
  assert corpus_lib.corpus().lines("validation") == validation


def test_vocabulary_is_trained_once_with_t5_ids(monkeypatch):
  vocab = tasks.VOCABULARY
  assert vocab.vocab_size == 4096 + EXTRA
  tok = vocab.tokenizer
  assert (tok.pad_id(), tok.eos_id(), tok.unk_id(), tok.bos_id()) == (0, 1, 2, -1)
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  path = vocab.sentencepiece_model_file
  mtime = os.stat(path).st_mtime_ns

  def no_training(*args):
    raise AssertionError("retrained")
  monkeypatch.setattr(vocab_lib, "_train", no_training)
  other = vocab_lib.CorpusVocabulary()
  assert other.sentencepiece_model_file == path and other.vocab_size == 4096 + EXTRA
  assert os.stat(path).st_mtime_ns == mtime
  text = "Return the number of items in a container."
  assert vocab.decode(vocab.encode(text)) == text


def test_vocabulary_equality_hash_and_pickle():
  vocab = tasks.VOCABULARY
  _ = vocab.vocab_size  # resolved instances still equal unresolved ones
  fresh = vocab_lib.CorpusVocabulary()
  assert vocab == fresh and hash(vocab) == hash(fresh)
  assert pickle.loads(pickle.dumps(vocab)) == vocab == copy.deepcopy(vocab)
  assert vocab != vocab_lib.CorpusVocabulary(extra_ids=0)
  assert vocab != seqio.PassThroughVocabulary(4196)
  assert len({vocab, fresh}) == 1


def test_custom_files_are_what_the_task_reads(custom_files):
  default_model = tasks.VOCABULARY.sentencepiece_model_file
  use_custom(custom_files)
  c = corpus_lib.corpus()
  assert c.files == tuple(custom_files[:2])
  source = seqio.get_mixture_or_task(tasks.DEFAULT_TASK).source
  read = {s: [ex["text"].decode() for ex in numpy_examples(lambda: source.get_dataset(s))]
          for s in ("train", "validation")}
  assert not set(read["train"]) & set(read["validation"])
  assert sorted(read["train"] + read["validation"]) == sorted(custom_files[2])
  assert 250 <= len(read["validation"]) <= 350  # min_lines=300 of 3001 lines
  # 3 blocks of 1024 lines: one seed in 6 keeps their order, so try a few seeds.
  shuffles = [[ex["text"].decode() for ex in numpy_examples(
      lambda: source.get_dataset("train", shuffle=True, seed=seed))] for seed in (3, 4, 5)]
  assert any(s != read["train"] for s in shuffles)
  assert all(sorted(s) == sorted(read["train"]) for s in shuffles)
  # The same vocabulary object follows the configuration: trained on the custom corpus now.
  assert tasks.VOCABULARY.sentencepiece_model_file != default_model
  assert tasks.VOCABULARY.vocab_size <= 1000 + EXTRA


def test_missing_file_names_the_gin_parameter(tmp_path):
  gin.parse_config(f"mtf_switch.tasks.text_files.paths = [{str(tmp_path / 'nope.txt')!r}]")
  with pytest.raises(FileNotFoundError, match=r"mtf_switch\.tasks\.text_files\.paths"):
    corpus_lib.corpus()
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    _ = tasks.VOCABULARY.vocab_size


def test_span_corruption_examples():
  task = seqio.get_mixture_or_task(tasks.DEFAULT_TASK)
  vocab = task.output_features["targets"].vocabulary
  size = vocab.vocab_size
  examples = numpy_examples(lambda: task.get_dataset(
      {"inputs": 256, "targets": 64}, split="train", shuffle=False, seed=1), 64)
  assert len(examples) == 64
  noise = kept = 0
  for ex in examples:
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs[-1] == targets[-1] == vocab.eos_id
    in_sentinels = inputs[inputs >= size - EXTRA]
    assert len(in_sentinels) >= 1
    np.testing.assert_array_equal(in_sentinels, size - 1 - np.arange(len(in_sentinels)))
    assert targets[0] == size - 1
    assert np.all(inputs < size) and np.all(targets < size)
    assert np.all(inputs[:-1] > 1) and np.all(targets[:-1] > 1)  # no pad/eos inside
    noise += np.sum((targets < size - EXTRA) & (targets > 1))
    kept += np.sum((inputs < size - EXTRA) & (inputs > 1))
  assert 0.10 <= noise / (noise + kept) <= 0.20

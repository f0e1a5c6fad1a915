"""SentencePiece vocabulary trained on the train split of the configured corpus (never downloaded).

The model is trained on first use, after gin is parsed, and cached in the cache directory
(see corpus.cache_dir) under a name keyed by the corpus fingerprint and the settings below.

Gin parameters:
  sentencepiece_model.vocab_size: number of SentencePiece pieces (default 4096), including
    pad=0, eos=1, unk=2 and 256 byte-fallback pieces; the 100 sentinels come on top of it.
    A soft limit: a corpus too small for it gives fewer pieces.
  sentencepiece_model.input_sentence_size: at most this many train lines, evenly spaced, are used
    for training (default 30000; about 12 s on 2 CPU cores for gcide's 150-character lines).
"""
import hashlib
import io
import json
import logging
import os
import time

import gin
import seqio
import sentencepiece as spm

from . import corpus as corpus_lib

EXTRA_IDS = 100  # sentinels, as in T5
_NUM_THREADS = 2  # fixed: the trained model depends on the thread count


@gin.configurable(module=corpus_lib.GIN_MODULE)
def sentencepiece_model(vocab_size=4096, input_sentence_size=30000) -> dict:
  """Returns the SentencePiece training settings.

  Args:
    vocab_size: number of pieces, without the sentinels (default 4096).
    input_sentence_size: maximum number of train lines used for training (default 30000).
  """
  return {"vocab_size": int(vocab_size), "input_sentence_size": int(input_sentence_size)}


def _train(corpus: corpus_lib.Corpus, settings: dict) -> bytes:
  """Trains a unigram model (T5 ids: pad=0, eos=1, unk=2, no bos) and returns it serialised."""
  lines = corpus.lines("train")
  if not lines:
    raise ValueError(f"the train split of the corpus {corpus.files} is empty")
  cap = settings["input_sentence_size"]
  if len(lines) > cap:  # deterministic, evenly spaced subsample
    lines = [lines[i * len(lines) // cap] for i in range(cap)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
      vocab_size=settings["vocab_size"], hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=0.9995,
      input_sentence_size=0, shuffle_input_sentence=False, num_threads=_NUM_THREADS,
      minloglevel=2)
  return model.getvalue()


def model_file(corpus: corpus_lib.Corpus = None) -> str:
  """Path of the SentencePiece model for `corpus` (default: the gin-configured corpus) and the
  gin-configured settings; trains and caches it on first use."""
  corpus = corpus or corpus_lib.corpus()
  settings = sentencepiece_model()
  key = hashlib.sha256(json.dumps(
      [corpus.fingerprint, settings, spm.__version__], sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(corpus_lib.cache_dir(), f"spm-{settings['vocab_size']}-{key}.model")
  if not os.path.exists(path):
    start = time.time()
    corpus_lib.atomic_write(path, _train(corpus, settings))
    logging.info("Trained SentencePiece model %s on %s in %.1f s", path, corpus.files,
                 time.time() - start)
  return path


class ConfiguredVocabulary(seqio.SentencePieceVocabulary):
  """seqio.SentencePieceVocabulary whose model file is the subclass's `resolve()` of the gin
  configuration in effect at use (not at construction), so that tasks can be registered at
  import time. A change of configuration (e.g. in tests) is picked up on next use.

  All instances of a class with the same extra_ids are equal and hash alike: they stand for "the
  configured vocabulary".
  """

  def __init__(self, extra_ids: int = 0):
    super().__init__(sentencepiece_model_file=None, extra_ids=extra_ids)

  @staticmethod
  def resolve() -> str:
    raise NotImplementedError

  @property
  def sentencepiece_model_file(self) -> str:
    return self.resolve()

  def _model_context(self):
    path = self.resolve()
    if path != self._sentencepiece_model_file:  # first use, or the configuration changed
      self._sentencepiece_model_file, self._model = path, None
    return super()._model_context()

  def __getstate__(self):
    state = super().__getstate__()
    state["_sentencepiece_model_file"] = None  # resolved again on use
    return state

  def __eq__(self, other):
    return type(self) is type(other) and self.__getstate__() == other.__getstate__()

  def __hash__(self):
    return hash((type(self), self._extra_ids, self._reverse_extra_ids))


class CorpusVocabulary(ConfiguredVocabulary):
  """The vocabulary of the configured corpus: model_file() trains it lazily, at first use."""

  resolve = staticmethod(model_file)

  def __init__(self, extra_ids: int = EXTRA_IDS):
    super().__init__(extra_ids=extra_ids)

  def __str__(self) -> str:
    # Does not resolve the model: str() may be called before gin is parsed.
    return (f"CorpusVocabulary(extra_ids={self._extra_ids}, "
            f"file={self._sentencepiece_model_file or 'unresolved'})")

"""Two domains for long CPU runs (issue 20, benchmarks/speedup_curve.py): GCIDE dictionary prose
and the Linux kernel documentation, trained on together and evaluated on each held-out split.

Tasks and mixture (registered at import; the files and the vocabulary are resolved at first use):
  TRAIN_TASK  `mtf_switch_gcide_kernel_span_corruption`: span corruption (as the default task)
    over both files read as one corpus: with shuffling, blocks of 1024 consecutive lines of both
    files in one shuffled order, so that an epoch is exactly one pass over both train splits
    (mixed in proportion to their size: GCIDE ~74% of the characters, kernel-docs ~26%).
  DOMAIN_TASKS  `mtf_switch_gcide_span_corruption`, `mtf_switch_kernel_docs_span_corruption`:
    one domain each, with the same held-out lines as TRAIN_TASK.
  EVAL_MIXTURE  `mtf_switch_gcide_kernel_eval`: the two domain tasks. perplexity_eval with
    `mesh_eval_dataset_fn.mixture_or_task_name = 'mtf_switch_gcide_kernel_eval'` scores each
    held-out split on its own (model_dir/eval_<task>_validation_<examples>).

Held-out splits: a line is held out by the same stable hash as mtf_switch.tasks.corpus, with a
threshold per file: 1% of GCIDE (the very lines of the 1% `validation` split that
benchmarks/reproduce.py scores) and 2% of kernel-docs (a 1% split would hold only ~470
paragraphs; 2% gives ~930), never seen in training.

Vocabulary: one SentencePiece model (4,096 pieces + 100 sentinels, vocab.py's settings) trained
on the train splits of both files (vocab.py samples 30,000 evenly spaced lines, so each domain in
proportion to its lines), shared by all three tasks. Measured on the held-out splits: GCIDE's own
vocabulary (the one benchmarks/reproduce.py's runs use) cuts kernel-docs into 2.42 characters
per token, the shared one into 3.10 (28% more tokens with GCIDE's), at a cost of 4% on GCIDE
(2.73 against 2.83). With the shared one the train splits are 11.85M (GCIDE) + 3.58M
(kernel-docs) = 15.4M tokens, the held-out splits 117k + 74k (`python
benchmarks/speedup_curve.py --data_stats`).

Gin parameters (module mtf_switch.tasks):
  domains.paths: {"gcide": path, "kernel_docs": path}; default ../shared/data/gcide.txt.gz and
    ../shared/data/kernel-docs.txt.gz next to the project directory.
  domains.validation_fractions: {"gcide": 0.01, "kernel_docs": 0.02}.
"""
import functools
import hashlib
import json
import os

import gin
import seqio

from . import corpus as corpus_lib
from . import vocab as vocab_lib

DOMAINS = ("gcide", "kernel_docs")
TRAIN_TASK = "mtf_switch_gcide_kernel_span_corruption"
DOMAIN_TASKS = {"gcide": "mtf_switch_gcide_span_corruption",
                "kernel_docs": "mtf_switch_kernel_docs_span_corruption"}
EVAL_MIXTURE = "mtf_switch_gcide_kernel_eval"
_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                     "shared", "data")
DEFAULT_PATHS = {"gcide": os.path.normpath(os.path.join(_DATA, "gcide.txt.gz")),
                 "kernel_docs": os.path.normpath(os.path.join(_DATA, "kernel-docs.txt.gz"))}
DEFAULT_FRACTIONS = {"gcide": 0.01, "kernel_docs": 0.02}


@gin.configurable(module=corpus_lib.GIN_MODULE)
def domains(paths=None, validation_fractions=None) -> dict:
  """{domain: (absolute path, held-out fraction)} for DOMAINS.

  Args:
    paths: {"gcide": ..., "kernel_docs": ...} (default DEFAULT_PATHS).
    validation_fractions: held-out fraction per domain (default DEFAULT_FRACTIONS).
  """
  paths = dict(DEFAULT_PATHS, **(paths or {}))
  fractions = dict(DEFAULT_FRACTIONS, **(validation_fractions or {}))
  out = {}
  for name in DOMAINS:
    path = os.path.abspath(os.path.expanduser(os.fspath(paths[name])))
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{name} corpus file {path!r} does not exist: set the gin parameter "
          f"{corpus_lib.GIN_MODULE}.domains.paths = {{'{name}': '/path/to/file.txt.gz'}} "
          "(default: ../shared/data/ next to the project directory)")
    fraction = float(fractions[name])
    if not 0 < fraction < 0.5:
      raise ValueError(f"{corpus_lib.GIN_MODULE}.domains.validation_fractions[{name!r}] must be "
                       f"in (0, 0.5), got {fraction}")
    out[name] = (path, fraction)
  return out


def domain_corpus(names=DOMAINS) -> corpus_lib.Corpus:
  """The corpus of the given domains (default both, in DOMAINS order), each file with its own
  held-out threshold (the same lines whichever domains are combined)."""
  configured = domains()
  files = tuple(configured[n][0] for n in names)
  stats = [corpus_lib._file_stat(p) for p in files]  # pylint: disable=protected-access
  buckets = tuple(int(round(configured[n][1] * corpus_lib._BUCKETS)) for n in names)  # pylint: disable=protected-access
  fingerprint = hashlib.sha256(json.dumps(
      [[d for d, _ in stats], list(buckets)]).encode()).hexdigest()
  return corpus_lib.Corpus(files, sum(n for _, n in stats), buckets, fingerprint)


def model_file() -> str:
  """The shared SentencePiece model: trained on the train splits of both domains."""
  return vocab_lib.model_file(domain_corpus())


class DomainsVocabulary(vocab_lib.ConfiguredVocabulary):
  """The vocabulary of both domains (trained lazily, at first use, and cached)."""

  resolve = staticmethod(model_file)

  def __init__(self, extra_ids: int = vocab_lib.EXTRA_IDS):
    super().__init__(extra_ids=extra_ids)

  def __str__(self) -> str:
    return (f"DomainsVocabulary(extra_ids={self._extra_ids}, "
            f"file={self._sentencepiece_model_file or 'unresolved'})")


VOCABULARY = DomainsVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}


def _dataset_fn(split, shuffle_files, seed=None, names=DOMAINS):
  return domain_corpus(names).dataset(split, shuffle_files, seed).map(lambda s: {"text": s})


def register(preprocessors):
  """Registers TRAIN_TASK, DOMAIN_TASKS and EVAL_MIXTURE with the given preprocessors (those of
  the default task: span corruption)."""
  sources = {TRAIN_TASK: DOMAINS}
  sources.update({DOMAIN_TASKS[n]: (n,) for n in DOMAINS})
  for name, names in sources.items():
    if name in seqio.TaskRegistry.names():  # imported again (e.g. also as top-level `tasks`)
      seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_dataset_fn, names=names),
                                        splits=("train", "validation")),
        preprocessors=list(preprocessors), output_features=OUTPUT_FEATURES, metric_fns=[])
  if EVAL_MIXTURE in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(EVAL_MIXTURE)
  seqio.MixtureRegistry.add(EVAL_MIXTURE, [DOMAIN_TASKS[n] for n in DOMAINS], default_rate=1.0)

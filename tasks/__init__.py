"""seqio tasks of mtf-switch. Importing this module registers DEFAULT_TASK.

`mtf_switch_last_word` (last_word.py): a text-to-text fine-tuning task over the same corpus.

`mtf_switch_span_corruption`: T5's span-corruption pretraining objective (noise density 0.15,
mean span length 3) over the configured corpus (see corpus.py: CPython's own documentation by
default, or the files of the gin parameter `mtf_switch.tasks.text_files.paths`), with a
SentencePiece vocabulary trained on that corpus (see vocab.py) plus 100 sentinels.

`mtf_switch_gcide_kernel_span_corruption` and its per-domain evaluation mixture
`mtf_switch_gcide_kernel_eval` (domains.py): GCIDE plus the Linux kernel documentation, with
held-out splits of both and one vocabulary trained on both.

The task is registered at import time (t5_mesh_transformer imports --module_import before it
parses the gin files); the corpus and the vocabulary are resolved lazily, at first use.
"""
import functools

import seqio
from t5.data import preprocessors as t5_preprocessors

from . import corpus
from . import vocab
from .corpus import text_files, validation_split  # noqa: F401  (gin configurables)
from .vocab import CorpusVocabulary, sentencepiece_model  # noqa: F401

DEFAULT_TASK = "mtf_switch_span_corruption"

VOCABULARY = CorpusVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}


def _dataset_fn(split, shuffle_files, seed=None):
  """The configured corpus as {"text": line} examples; shuffle_files shuffles blocks of lines."""
  return corpus.corpus().dataset(split, shuffle_files, seed).map(lambda s: {"text": s})


# T5's span corruption of a {"text": line} source.
SPAN_CORRUPTION = [
    functools.partial(t5_preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
    seqio.preprocessors.tokenize,
    functools.partial(t5_preprocessors.span_corruption,
                      noise_density=0.15, mean_noise_span_length=3.0),
    seqio.preprocessors.append_eos_after_trim,
]

if DEFAULT_TASK in seqio.TaskRegistry.names():  # imported again (e.g. also as top-level `tasks`)
  seqio.TaskRegistry.remove(DEFAULT_TASK)
seqio.TaskRegistry.add(
    DEFAULT_TASK,
    source=seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
    preprocessors=SPAN_CORRUPTION,
    output_features=OUTPUT_FEATURES,
    metric_fns=[])
from . import domains  # noqa: E402
from . import last_word  # noqa: E402
from . import paper  # noqa: E402,F401  (registers the paper's pretraining and Table 5 tasks)

last_word.register(OUTPUT_FEATURES)
domains.register(SPAN_CORRUPTION)

"""Work-arounds for upstream bugs, applied when `mtf_switch` is imported."""
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np


def _tokenize_string_features(add_pretokenized):
  """Scoring from strings (`--mode=score`, `utils.run.mode="score_from_strings"`) hands
  `save_scores` examples whose "inputs"/"targets" are the strings themselves; upstream expects
  id arrays (`.tolist()`, `np.argmax`) and crashes right after writing the .scores file. Keep each
  string as "<feature>_pretokenized" and replace the feature by its token ids."""

  def wrapped(examples, vocabulary):
    vocabs = {"inputs": mtf_utils.inputs_vocabulary(vocabulary),
              "targets": mtf_utils.targets_vocabulary(vocabulary)}
    for example in examples:
      for name, vocab in vocabs.items():
        value = example.get(name)
        if isinstance(value, (bytes, str)):
          text = value.decode("utf-8") if isinstance(value, bytes) else value
          example.setdefault(name + "_pretokenized", text)
          example[name] = np.array(vocab.encode(text), np.int32)
    return add_pretokenized(examples, vocabulary)

  wrapped.mtf_switch_patched = True
  return wrapped


def apply():
  fn = mtf_utils._maybe_add_pretokenized_features  # pylint: disable=protected-access
  if not getattr(fn, "mtf_switch_patched", False):
    mtf_utils._maybe_add_pretokenized_features = _tokenize_string_features(fn)  # pylint: disable=protected-access

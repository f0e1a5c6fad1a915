"""Work-arounds for upstream bugs, applied when `mtf_switch` is imported."""
from mesh_tensorflow.transformer import utils as mtf_utils


def _strings_are_pretokenized(add_pretokenized):
  """`--mode=score` passes examples whose "inputs"/"targets" are already strings (bytes); the
  upstream helper calls `.tolist()` on them and crashes after writing the .scores file. Treat
  such strings as their own pretokenized text and leave id arrays to the original."""

  def wrapped(examples, vocabulary):
    for example in examples:
      for name in ("inputs", "targets"):
        value = example.get(name)
        if isinstance(value, (bytes, str)) and name + "_pretokenized" not in example:
          example[name + "_pretokenized"] = value
    return add_pretokenized(examples, vocabulary)

  wrapped.mtf_switch_patched = True
  return wrapped


def apply():
  fn = mtf_utils._maybe_add_pretokenized_features  # pylint: disable=protected-access
  if not getattr(fn, "mtf_switch_patched", False):
    mtf_utils._maybe_add_pretokenized_features = _strings_are_pretokenized(fn)  # pylint: disable=protected-access

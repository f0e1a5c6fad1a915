"""Work-arounds for upstream bugs, applied when `mtf_switch` is imported."""
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import tensorflow.compat.v1 as tf
from tensorflow.python.ops import gen_logging_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.tpu import tpu_function  # pylint: disable=g-direct-tensorflow-import

from mtf_switch import layouts
from mtf_switch import metrics


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


def _explain_undivided_layout(slice_shape):
  """Lowering a layout that does not divide a dimension fails with "Tensor dimension size not
  divisible by mesh dimension size" and a layout tuple; name the dimension, the mesh axis and
  the gin parameters to change instead."""

  def wrapped(self, tensor_shape):
    try:
      return slice_shape(self, tensor_shape)
    except ValueError:  # explained only when it fails: slice_shape runs for every tensor
      bad = layouts.undivided(tensor_shape, self.shape, self.layout_rules)
      if not bad:
        raise
      raise ValueError(layouts.error_message(
          *bad, where="a tensor of shape %s" % tensor_shape)) from None

  wrapped.mtf_switch_patched = True
  return wrapped


def _check_devices(init):
  """PlacementMeshImpl silently ignores extra devices (and fails later on too few): one device
  per processor of the mesh, or a clear error."""

  def wrapped(self, shape, layout, devices):
    init(self, shape, layout, devices)
    if len(devices) != self.size:
      raise ValueError(
          "mesh_shape %s has %d processors but %d devices were given (utils.run.mesh_devices): "
          "list one device per processor, e.g. %r, or change mesh_shape."
          % (",".join("%s:%d" % (d.name, d.size) for d in self.shape.dims), self.size,
             len(devices),
             ["gpu:%d" % i for i in range(self.size)]))

  wrapped.mtf_switch_patched = True
  return wrapped


def _summaries_off_tpu(lower):
  """mesh-tensorflow hands scalar summaries to the TPU host call, which t5_mesh_transformer
  drops when not on TPU: there, also make the Switch summaries (metrics.py) plain TensorFlow
  summaries, which the Estimator writes every save_summary_steps."""

  def wrapped(self, lowering):
    lower(self, lowering)
    if (self.name.startswith(metrics.PREFIX + "/")
        and tpu_function.get_tpu_context().number_of_shards is None):
      value = lowering.tensors[self.outputs[0]].to_laid_out_tensor().tensor_list[0]
      # the tag exactly (tf.summary.scalar would make the name unique in the TF graph: "_1")
      summary = gen_logging_ops.scalar_summary(tags=self.name, values=value)
      tf.add_to_collection(tf.GraphKeys.SUMMARIES, summary)

  wrapped.mtf_switch_patched = True
  return wrapped


def apply():
  fn = mtf_utils._maybe_add_pretokenized_features  # pylint: disable=protected-access
  if not getattr(fn, "mtf_switch_patched", False):
    mtf_utils._maybe_add_pretokenized_features = _tokenize_string_features(fn)  # pylint: disable=protected-access
  if not getattr(mtf.MeshImpl.slice_shape, "mtf_switch_patched", False):
    mtf.MeshImpl.slice_shape = _explain_undivided_layout(mtf.MeshImpl.slice_shape)
  impl = mtf.placement_mesh_impl.PlacementMeshImpl
  if not getattr(impl.__init__, "mtf_switch_patched", False):
    impl.__init__ = _check_devices(impl.__init__)
  if not getattr(mtf.ScalarSummaryOperation.lower, "mtf_switch_patched", False):
    mtf.ScalarSummaryOperation.lower = _summaries_off_tpu(mtf.ScalarSummaryOperation.lower)

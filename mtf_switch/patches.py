"""Work-arounds for upstream bugs, applied when `mtf_switch` is imported."""
import importlib.abc
import importlib.machinery
import inspect
import os
import sys

from absl import flags
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import tensorflow.compat.v1 as tf
from tensorflow.python.ops import gen_logging_ops  # pylint: disable=g-direct-tensorflow-import
from tensorflow.python.tpu import tpu_function  # pylint: disable=g-direct-tensorflow-import

from mtf_switch import config
from mtf_switch import layouts
from mtf_switch import metrics


def _tokenize_string_features(add_pretokenized):
  """Scoring from strings (`--mode=score`, `utils.run.mode="score_from_strings"`) hands
  `save_scores` examples whose "inputs"/"targets" are the strings themselves; upstream expects
  id arrays (`.tolist()`, `np.argmax`) and crashes right after writing the .scores file. Keep each
  string as "<feature>_pretokenized" and replace the feature by its token ids as they were scored
  (EOS appended, cut to the sequence length: _SCORING), so that `.lengths` counts the tokens of
  each score."""

  def wrapped(examples, vocabulary):
    vocabs = {"inputs": mtf_utils.inputs_vocabulary(vocabulary),
              "targets": mtf_utils.targets_vocabulary(vocabulary)}
    for example in examples:
      for name, vocab in vocabs.items():
        value = example.get(name)
        if isinstance(value, (bytes, str)):
          text = value.decode("utf-8") if isinstance(value, bytes) else value
          example.setdefault(name + "_pretokenized", text)
          length, eos = _SCORING.get(name, (None, None))
          ids = vocab.encode(text) + ([eos] if eos else [])
          example[name] = np.array(ids[:length], np.int32)
    return add_pretokenized(examples, vocabulary)

  wrapped.mtf_switch_patched = True
  return wrapped


# {feature: (sequence length, EOS id or 0)} of the score_from_strings call under way.
_SCORING = {}


def _note_how_strings_are_scored(score_from_strings):
  """Notes score_from_strings' lengths and EOS ids for _tokenize_string_features (upstream
  encodes inputs with EOS, and targets with EOS when score_eos)."""
  signature = inspect.signature(score_from_strings)

  def wrapped(*args, **kwargs):
    call = signature.bind(*args, **kwargs)
    call.apply_defaults()
    lengths, eos = call.arguments["sequence_length"], call.arguments["eos_id"]
    if isinstance(lengths, int):
      lengths = {"inputs": lengths, "targets": lengths}
    _SCORING.update(inputs=(lengths.get("inputs"), eos),
                    targets=(lengths["targets"], eos if call.arguments["score_eos"] else 0))
    try:
      return score_from_strings(*args, **kwargs)
    finally:
      _SCORING.clear()

  wrapped.mtf_switch_patched = True
  return wrapped


def _decode_to_text(decode):
  """With a vocabulary that detokenizes in the graph (seqio's `decode_tf`, off TPU), `decode`
  yields bytes, which `--mode=predict` (decode_from_file) writes as Python literals, b'...' with
  escapes, where an exported model (`--mode=export_predict`) answers the UTF-8 text. Yield text."""

  def wrapped(*args, **kwargs):
    for output in decode(*args, **kwargs):
      yield tf.compat.as_text(output)

  wrapped.mtf_switch_patched = True
  return wrapped


def _respec(spec, **fields):
  """`spec` (a TPUEstimatorSpec) with `fields` replaced, made by its constructor: __new__
  records the eval metrics and host call, which namedtuple's _replace would leave stale."""
  return type(spec)(**dict(spec._asdict(), **fields))


def _trim_to_request(make_model_fn):
  """An exported scoring model (`--mode=export_score`) answers a request of n < batch_size
  examples with batch_size scores and targets, the padding rows' included (0 and ""): upstream
  trims only the predictions of `--mode=export_predict` to the request's size. Trim all."""

  def make(*args, **kwargs):
    model_fn = make_model_fn(*args, **kwargs)

    def wrapped(features, labels, mode, params=None, config=None):  # the arguments estimators pass
      size = features.get("predict_batch_size")  # set by export_model's serving_input_fn only
      spec = model_fn(features, labels, mode, params, config)
      if size is None:
        return spec
      # export_outputs=None: made again from the trimmed predictions, as when the spec is made
      return _respec(spec, predictions={k: v[:size] for k, v in spec.predictions.items()},
                     export_outputs=None)

    return wrapped

  make.mtf_switch_patched = True
  return make


def _serializable_collections(make_model_fn):
  """mesh-tensorflow keeps its scalar summaries as (name, tensor) tuples in a graph collection,
  read by the TPU host call while the model_fn runs; the Estimator then writes the meta graph and
  logs "Issue encountered when serializing mtf_scalar_summaries ... 'tuple' object has no
  attribute 'name'" for every Switch model. Empty the collection once the model_fn is done."""

  def make(*args, **kwargs):
    model_fn = make_model_fn(*args, **kwargs)

    def wrapped(features, labels, mode, params=None, config=None):  # the arguments estimators pass
      spec = model_fn(features, labels, mode, params, config)
      tf.get_default_graph().clear_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY)
      return spec

    return wrapped

  make.mtf_switch_patched = True
  return make


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


def _switch_summaries(lower):
  """mesh-tensorflow hands scalar summaries to the TPU host call, which t5_mesh_transformer
  drops when not on TPU: there, also make the Switch summaries (metrics.py) plain TensorFlow
  summaries, which the Estimator writes every save_summary_steps. Everywhere, note their TF
  values for the evaluation metrics (_switch_eval_metrics)."""

  def wrapped(self, lowering):
    lower(self, lowering)
    if not self.name.startswith(metrics.PREFIX + "/"):
      return
    value = lowering.tensors[self.outputs[0]].to_laid_out_tensor().tensor_list[0]
    metrics.lowered(self.name, value)
    in_loop = tf.get_default_graph()._get_control_flow_context() is not None  # pylint: disable=protected-access
    if in_loop and not _switch_summaries.warned:  # e.g. serialised microbatches (a tf.while_loop)
      _switch_summaries.warned = True
      tf.logging.warning("Switch summaries are not written: the step runs in a while loop "
                         "(num_microbatches > 1); set utils.serialize_num_microbatches."
                         "tokens_per_microbatch_per_replica = None to get them")
    if tpu_function.get_tpu_context().number_of_shards is None and not in_loop:
      # the tag exactly (tf.summary.scalar would make the name unique in the TF graph: "_1")
      summary = gen_logging_ops.scalar_summary(tags=self.name, values=value)
      tf.add_to_collection(tf.GraphKeys.SUMMARIES, summary)

  wrapped.mtf_switch_patched = True
  return wrapped


_switch_summaries.warned = False


def _switch_eval_metrics(make_model_fn):
  """An evaluation (utils.run's perplexity_eval / eval) writes only its metrics: add every
  Switch summary of the graph as a metric to mesh-tensorflow's teacher-forced ones
  (neg_log_perplexity, ...): its mean over the eval batches, weighted by the batch's real
  tokens at that layer (padding batches count for nothing); `tokens` itself is summed."""

  def make(*args, **kwargs):
    model_fn = make_model_fn(*args, **kwargs)

    def wrapped(features, labels, mode, params=None, config=None):  # the arguments estimators pass
      spec = model_fn(features, labels, mode, params, config)
      values = metrics.lowered_values(tf.get_default_graph())
      if mode != tf.estimator.ModeKeys.EVAL or not values or spec.eval_metrics is None:
        return spec
      metric_fn, tensors = spec.eval_metrics
      tags = sorted(values)

      def with_switch(*args):
        results = metric_fn(*args[:len(tensors)])
        switch = dict(zip(tags, args[len(tensors):]))
        for tag, value in switch.items():
          layer, metric = metrics.parse(tag)
          tokens = switch["%s/%s/tokens" % (metrics.PREFIX, layer)]
          results[tag] = (mtf_utils.metric_sum(value) if metric == "tokens"
                          else tf.metrics.mean(value, tokens))
        return results

      return _respec(spec, eval_metrics=(with_switch, list(tensors) + [
          tf.reshape(values[tag], [1]) for tag in tags]))

    return wrapped

  make.mtf_switch_patched = True
  return make


def _finetune_from_the_binary(finetune):
  """`t5_mesh_transformer --use_model_api --mode=finetune` fails upstream (t5 0.9.4): the binary
  passes `steps=` and `checkpoint_steps=`, which MtfModel.finetune names `finetune_steps` and
  `pretrained_checkpoint_step` (TypeError). Accept both names."""

  def wrapped(self, mixture_or_task_name, finetune_steps=None, pretrained_model_dir=None,
              pretrained_checkpoint_step=-1, split="train", steps=None, checkpoint_steps=None):
    finetune_steps = steps if finetune_steps is None else finetune_steps
    if checkpoint_steps is not None:
      pretrained_checkpoint_step = checkpoint_steps
    return finetune(self, mixture_or_task_name, finetune_steps, pretrained_model_dir,
                    pretrained_checkpoint_step, split)

  wrapped.mtf_switch_patched = True
  return wrapped


def _command_line_after_operative_config(parse_operative_config, skip_unknown):
  """MtfModel (the model API: every --use_model_api mode, and t5's Python workflow) parses the
  model directory's operative_config.gin after the command line, so an evaluation, prediction,
  scoring, export or fine-tuning silently ignores --gin_file/--gin_param (scoped or not): apply
  the command line again on top (config.override: it also reaches the operative config's
  per-stack bindings)."""

  def wrapped(model_dir):
    parse_operative_config(model_dir)
    with gin.unlock_config():
      config.override(*config.command_line(), skip_unknown=skip_unknown)

  wrapped.mtf_switch_patched = True
  return wrapped


def _extra_bindings_win(estimator):
  """MtfModel(extra_gin_bindings=[...]) is parsed after the operative config, but an unscoped
  binding there loses to the operative config's per-stack ones: apply it with config.override."""

  def wrapped(self, *args, **kwargs):
    with gin.unlock_config():
      config.override([], self._gin_bindings or [])  # pylint: disable=protected-access
    return estimator(self, *args, **kwargs)

  wrapped.mtf_switch_patched = True
  return wrapped


def _gin_params_win(parse_gin_defaults_and_flags):
  """t5_mesh_transformer's --gin_param replaces the command line's files' bindings of the same
  parameter in narrower scopes too (config.override): `--gin_param=SwitchFFN.x=...` reaches a
  model file's `encoder/SwitchFFN.x`."""

  def wrapped(skip_unknown=False, finalize_config=True):
    parse_gin_defaults_and_flags(skip_unknown=skip_unknown, finalize_config=False)
    with gin.unlock_config():
      config.override([], config.command_line()[1], skip_unknown=skip_unknown)
    if finalize_config:
      gin.finalize()

  wrapped.mtf_switch_patched = True
  return wrapped


def _makedirs_first(write_lines_to_file):
  """`--use_model_api --mode=eval` writes the task's targets into the eval summary directory
  before anything creates it (fine on GCS, NotFoundError on a local disk): create it first."""

  def wrapped(lines, filename):
    tf.io.gfile.makedirs(os.path.dirname(filename))
    return write_lines_to_file(lines, filename)

  wrapped.mtf_switch_patched = True
  return wrapped


@gin.configurable(module="mtf_switch")
def random_seed(seed=None):
  """TensorFlow's graph-level random seed for every estimator the binary builds (initialisation,
  router jitter, dropout); None (default) leaves it unset, i.e. different in every run. The data
  order and span-corruption noise have their own seeds: `mesh_train_dataset_fn.seed` and
  `mesh_eval_dataset_fn.seed` (gin/runs/seeded.gin sets all three from SEED)."""
  return seed


def _seeded_estimator(get_estimator):
  """t5_mesh_transformer never sets RunConfig.tf_random_seed, so no two runs start from the same
  initialisation; use `mtf_switch.random_seed.seed` when it is set."""

  def wrapped(*args, **kwargs):
    estimator = get_estimator(*args, **kwargs)
    seed = random_seed()
    if seed is not None:
      estimator._config = estimator._config.replace(tf_random_seed=int(seed))  # pylint: disable=protected-access
    return estimator

  wrapped.mtf_switch_patched = True
  return wrapped


def apply():
  fn = mtf_utils._maybe_add_pretokenized_features  # pylint: disable=protected-access
  if not getattr(fn, "mtf_switch_patched", False):
    mtf_utils._maybe_add_pretokenized_features = _tokenize_string_features(fn)  # pylint: disable=protected-access
  if not getattr(mtf_utils.score_from_strings, "mtf_switch_patched", False):
    mtf_utils.score_from_strings = _note_how_strings_are_scored(mtf_utils.score_from_strings)
  if not getattr(mtf_utils.decode, "mtf_switch_patched", False):
    mtf_utils.decode = _decode_to_text(mtf_utils.decode)
  if not getattr(mtf_utils.tpu_estimator_model_fn, "mtf_switch_patched", False):
    mtf_utils.tpu_estimator_model_fn = _serializable_collections(_switch_eval_metrics(
        _trim_to_request(mtf_utils.tpu_estimator_model_fn)))
  if not getattr(mtf_utils.get_estimator, "mtf_switch_patched", False):
    mtf_utils.get_estimator = _seeded_estimator(mtf_utils.get_estimator)
  if not getattr(mtf.MeshImpl.slice_shape, "mtf_switch_patched", False):
    mtf.MeshImpl.slice_shape = _explain_undivided_layout(mtf.MeshImpl.slice_shape)
  impl = mtf.placement_mesh_impl.PlacementMeshImpl
  if not getattr(impl.__init__, "mtf_switch_patched", False):
    impl.__init__ = _check_devices(impl.__init__)
  if not getattr(mtf_utils.parse_gin_defaults_and_flags, "mtf_switch_patched", False):
    mtf_utils.parse_gin_defaults_and_flags = _gin_params_win(mtf_utils.parse_gin_defaults_and_flags)
  if "t5.models.mtf_model" in sys.modules:
    _apply_to_t5()
  elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport("t5.models.mtf_model", _apply_to_t5))
  if not getattr(mtf.ScalarSummaryOperation.lower, "mtf_switch_patched", False):
    mtf.ScalarSummaryOperation.lower = _switch_summaries(mtf.ScalarSummaryOperation.lower)


def _apply_to_t5():
  """The patches of t5.models (imported by t5_mesh_transformer before --module_import, and by
  a Python user before or after mtf_switch), and the model API's schedule (gin/runs/model_api.gin)
  unless one is bound."""
  mtf_model = sys.modules["t5.models.mtf_model"]
  model = mtf_model.MtfModel
  if not getattr(model.finetune, "mtf_switch_patched", False):
    model.finetune = _finetune_from_the_binary(model.finetune)
  if not getattr(model.estimator, "mtf_switch_patched", False):
    model.estimator = _extra_bindings_win(model.estimator)
  if not getattr(mtf_model._parse_operative_config, "mtf_switch_patched", False):  # pylint: disable=protected-access
    mtf_model._parse_operative_config = _command_line_after_operative_config(  # pylint: disable=protected-access
        mtf_model._parse_operative_config,  # pylint: disable=protected-access
        sys.modules["t5.models.mesh_transformer"].DEPRECATED_GIN_REFERENCES)
  if not config.bound("MtfModel.learning_rate_schedule"):
    with gin.unlock_config():
      gin.parse_config_file(os.path.join(config.gin_dirs()[0], "runs", "model_api.gin"))
  t5_utils = sys.modules["t5.models.utils"]
  if not getattr(t5_utils.write_lines_to_file, "mtf_switch_patched", False):
    t5_utils.write_lines_to_file = _makedirs_first(t5_utils.write_lines_to_file)


class _AfterImport(importlib.abc.MetaPathFinder):
  """Calls `then()` right after the module `name` is first imported, then steps aside."""

  def __init__(self, name, then):
    self.name, self.then = name, then

  def find_spec(self, fullname, path=None, target=None):
    if fullname != self.name:
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
    exec_module = spec.loader.exec_module

    def exec_then(module):
      exec_module(module)
      self.then()

    spec.loader.exec_module = exec_then
    return spec

"""Early, clear errors for inputs that upstream accepts or reports late (applied on import).

  - Layout and group checks before the graph is built: when the binary creates its estimator
    (seconds after start), each Switch layer's experts and expert_hidden must divide over the
    mesh axes the layout splits them over and the batch over the batch axis; when training
    starts (before the input pipeline is built), the training batch must split into routing
    groups with an expert capacity of at least one token. Later, the same errors would come
    from building the graph, after the input pipeline, i.e. tens of seconds on.
  - One training run per model directory: training takes a lock file (LOCK_FILE) in the
    model directory and refuses to start while another live run holds it, naming that run.
  - An exported SavedModel (--mode=export_predict / export_score) asked for more examples
    than its batch size fails with that limit (upstream: "Dataset had more than one element").
"""
import contextlib
import datetime
import errno
import fcntl
import inspect
import json
import os
import socket
import sys
import threading
import time

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf

from mtf_switch import dispatch as dispatch_lib
from mtf_switch import layers
from mtf_switch import layouts

LOCK_FILE = "training.lock"

# ---------------------------------------------------------------- layout and groups, early


def _switch_layers(model, sequence_length):
  """(SwitchFFN, its stack's sequence length or None, whether it has an expert_hidden
  dimension) for every Switch layer of a Bitransformer or Unitransformer."""
  lengths = (sequence_length if isinstance(sequence_length, dict)
             else {"inputs": sequence_length, "targets": sequence_length})
  if isinstance(model, transformer.Bitransformer):
    stacks = [(model.encoder, lengths.get("inputs")), (model.decoder, lengths.get("targets"))]
  elif isinstance(model, transformer.Unitransformer):
    stacks = [(model, lengths.get("targets"))]
  else:  # e.g. a student-teacher pair: left to the graph
    return
  for stack, length in stacks:
    for layer in getattr(stack.layer_stack, "layers", ()):
      if isinstance(layer, layers.SwitchFFN):
        yield layer, length, True
      elif isinstance(getattr(layer, "projection", None), layers.SwitchFFN):  # SwitchSelfAttention
        yield layer.projection, length, False


def check_layout(model, mesh_shape, layout_rules, batch_size):
  """What does not depend on the mode: each Switch layer's experts (and expert_hidden) and the
  batch divide over the mesh axes the layout splits them over. Raises ValueError."""
  mesh_shape = mtf.convert_to_shape(mesh_shape)
  layout_rules = mtf.convert_to_layout_rules(layout_rules)
  batch = mtf.Dimension("batch", batch_size)
  bad = layouts.undivided(mtf.Shape([batch]), mesh_shape, layout_rules)
  if bad:
    raise ValueError(layouts.error_message(*bad, where="the batch: --batch_size or "
                                           "utils.run.batch_size"))
  for layer, _, has_hidden in _switch_layers(model, None):
    layers._check_divisible(mtf.Dimension("experts", layer.num_experts), layout_rules,  # pylint: disable=protected-access
                            mesh_shape)
    hidden = mtf.Dimension("expert_hidden", layer.hidden_size)
    bad = has_hidden and layouts.undivided(mtf.Shape([hidden]), mesh_shape, layout_rules)
    if bad:
      raise ValueError(layouts.error_message(*bad, where="the experts: SwitchFFN.hidden_size"))


def check_training_groups(model, mesh_shape, layout_rules, batch_size, sequence_length):
  """What training will ask of each Switch layer: its tokens per (micro)batch split into
  routing groups over the batch mesh axis, with an expert capacity of at least one token.
  Raises the ValueError the layer would raise while the graph is built."""
  mesh_shape = mtf.convert_to_shape(mesh_shape)
  layout_rules = mtf.convert_to_layout_rules(layout_rules)
  outer = _gin_value("tpu_estimator_model_fn.outer_batch_size", 1) or 1
  batch = mtf.Dimension("batch", batch_size // outer)
  if isinstance(sequence_length, dict):
    microbatches = mtf_utils.serialize_num_microbatches(batch, sequence_length, mesh_shape,
                                                        layout_rules)
  else:
    microbatches = 1
  ways = mtf.tensor_dim_to_mesh_dim_size(layout_rules, mesh_shape, batch)
  for layer, length, _ in _switch_layers(model, sequence_length):
    if not length:
      continue
    _, group_size = dispatch_lib.split_into_groups(
        batch.size // microbatches * length, layer.group_size, ways)
    if getattr(layer, "dropless_train", False) or layer.capacity_factor_train <= 0:
      continue  # no capacity, or the fixed capacity min_capacity
    dispatch_lib.expert_capacity(group_size, layer.num_experts, layer.capacity_factor_train,
                                 layer.min_capacity)


def _gin_value(name, default):
  try:
    return gin.query_parameter(name)
  except ValueError:
    return default


_built = threading.local()  # the model and settings of the last model_fn made in this thread


def _check_before_graph(make_model_fn):
  """tpu_estimator_model_fn is called when the estimator is created, with the model already
  built: check the layout there, and keep what the training check needs."""

  def make(*args, **kwargs):
    settings = kwargs  # get_estimator passes every argument by name
    model = settings.get("transformer_model")
    if model is not None and "batch_size" in settings and "mesh_shape" in settings:
      check_layout(model, settings["mesh_shape"], settings["layout_rules"],
                   settings["batch_size"])
      _built.last = (model, settings["mesh_shape"], settings["layout_rules"],
                     settings["batch_size"], settings.get("sequence_length"))
    return make_model_fn(*args, **kwargs)

  make.mtf_switch_patched = True
  make.mtf_switch_guard = "check_before_graph"
  return make


# ---------------------------------------------------------------- one run per model directory


class ModelDirInUse(RuntimeError):
  """Another live run is training into the model directory."""


def _process_start(pid):
  """The start time of process `pid` in clock ticks since boot (Linux), or None."""
  try:
    with open("/proc/%d/stat" % pid) as f:
      return int(f.read().rpartition(")")[2].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _identity():
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv), "process_start": _process_start(os.getpid())}


def _describe(run):
  return "pid %s on host %s, started %s, command: %s" % (
      run.get("pid"), run.get("host"), run.get("started"), run.get("command"))


def _alive(run):
  """Whether the run recorded in a lock file is still running (on this host), or None if
  that cannot be told (another host)."""
  if run.get("host") != socket.gethostname():
    return None
  pid = run.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  started = run.get("process_start")
  return started is None or _process_start(pid) in (None, started)  # not a reused pid


def lock_model_dir(model_dir):
  """Takes the training lock of `model_dir`: returns a handle for unlock_model_dir. Raises
  ModelDirInUse, naming the other run, while another live run holds it. A lock left by a run
  that has ended (killed, crashed) is taken over with a warning naming it.

  The lock is the file LOCK_FILE, holding the run's identity as JSON, with an exclusive flock
  on it while the run lasts (the kernel drops it when the process ends, however it ends)."""
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      _refuse(model_dir, path, _read(path, wait=True), "it holds the lock")
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:  # else the holder removed the file between our open and flock: again
      break
    os.close(fd)
  previous = _read(path)
  if previous and previous.get("pid") != os.getpid():
    alive = _alive(previous)
    if alive or alive is None:  # running without the flock (a file system without locks?)
      os.close(fd)
      _refuse(model_dir, path, previous, "it is still running" if alive else
              "it runs on another host, where this one cannot tell whether it has ended")
    tf.logging.warning("Taking over the training lock %s of a run that has ended (%s).",
                       path, _describe(previous))
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(_identity()) + "\n").encode(), 0)
  os.fsync(fd)
  return fd, path


def unlock_model_dir(handle):
  """Releases a lock_model_dir handle: removes the lock file and drops the flock."""
  fd, path = handle
  try:
    if os.stat(path).st_ino == os.fstat(fd).st_ino:
      os.unlink(path)
  except FileNotFoundError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def training_lock(model_dir):
  """lock_model_dir for the duration of a `with` block (local model directories only)."""
  if "://" in model_dir:  # gs://... : no flock there
    tf.logging.info("No training lock for %s (not a local directory).", model_dir)
    yield
    return
  handle = lock_model_dir(model_dir)
  try:
    yield
  finally:
    unlock_model_dir(handle)


def _read(path, wait=False):
  """The run recorded in a lock file, or None; with `wait`, give a holder that has just
  taken the lock a second to write it."""
  for _ in range(10 if wait else 1):
    try:
      with open(path) as f:
        run = json.loads(f.read() or "null")
      if isinstance(run, dict):
        return run
    except (OSError, ValueError):
      pass
    if wait:
      time.sleep(0.1)
  return None


def _refuse(model_dir, path, run, why):
  raise ModelDirInUse(
      "Another run is training into --model_dir=%s (%s): %s. Two runs in one model directory "
      "overwrite each other's checkpoints: wait for it to end, stop it, or train into another "
      "--model_dir. (Lock file: %s; delete it only if that run is no longer running.)" % (
          model_dir, why, _describe(run) if run else "identity unreadable", path))


def _lock_training(get_estimator):
  """The estimator's train() (utils.run's train mode, MtfModel.train and finetune) holds the
  model directory's training lock; before it, the training groups are checked."""

  def wrapped(*args, **kwargs):
    _built.last = None
    estimator = get_estimator(*args, **kwargs)
    built, train = _built.last, estimator.train

    def locked_train(*train_args, **train_kwargs):
      if built:
        check_training_groups(*built)
      with training_lock(estimator.model_dir):
        return train(*train_args, **train_kwargs)

    estimator.train = locked_train
    return estimator

  wrapped.mtf_switch_patched = True
  wrapped.mtf_switch_guard = "lock_training"
  return wrapped


# ---------------------------------------------------------------- export: the request limit


def request_limit_message(batch_size):
  return ("This SavedModel takes at most %d examples per request (exported with --batch_size="
          "%d, or utils.run.batch_size): split the request, or export again with a larger "
          "--batch_size." % (batch_size, batch_size))


def _limit_request(serving_input_fn, batch_size):
  """serving_input_fn whose graph checks the request's size before batching it."""

  def limited():
    receiver = serving_input_fn()
    graph = tf.get_default_graph()
    size = receiver.features["predict_batch_size"]
    checks = [tf.Assert(tf.less_equal(size, batch_size), [
        request_limit_message(batch_size), "Examples in this request:", size])]
    strings = receiver.receiver_tensors
    if "inputs" in strings and "targets" in strings:  # export_score: pairs
      inputs, targets = tf.shape(strings["inputs"])[0], tf.shape(strings["targets"])[0]
      checks.append(tf.Assert(tf.equal(inputs, targets), [
          "Send one target per input: this request has", inputs, "inputs and", targets,
          "targets."]))
    # get_single_element of the over-full batch would fail first (graph order is free)
    for op in graph.get_operations():
      if op.type == "DatasetToSingleElement":
        for check in checks:
          op._add_control_input(check)  # pylint: disable=protected-access
    return receiver

  return limited


class _LimitedExport(object):
  """An estimator whose export_saved_model uses _limit_request."""

  def __init__(self, estimator, batch_size):
    self._estimator, self._batch_size = estimator, batch_size

  def __getattr__(self, name):
    return getattr(self._estimator, name)

  def export_saved_model(self, export_dir, serving_input_receiver_fn, *args, **kwargs):
    return self._estimator.export_saved_model(
        export_dir, _limit_request(serving_input_receiver_fn, self._batch_size), *args,
        **kwargs)


def _export_with_limit(export_model):
  """mesh-tensorflow's export_model asserts the request size without running the assertion
  (graph mode): a request over --batch_size fails with "Dataset had more than one element".
  Check it first, in the exported graph, with the limit in the message."""
  signature = inspect.signature(export_model)

  def wrapped(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    bound.arguments["estimator"] = _LimitedExport(bound.arguments["estimator"],
                                                  bound.arguments["batch_size"])
    return export_model(*bound.args, **bound.kwargs)

  wrapped.mtf_switch_patched = True
  wrapped.mtf_switch_guard = "export_with_limit"
  return wrapped


def apply():
  """Installs the guards (idempotent)."""
  for name, guard in (("tpu_estimator_model_fn", _check_before_graph),
                      ("get_estimator", _lock_training),
                      ("export_model", _export_with_limit)):
    fn = getattr(mtf_utils, name)
    if getattr(fn, "mtf_switch_guard", None) != guard.__name__.lstrip("_"):
      setattr(mtf_utils, name, guard(fn))

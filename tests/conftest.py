"""Shared fixtures: a clean gin config per test, a helper that runs a SwitchFFN on a CPU mesh,
and one that reads a tf.data pipeline in graph mode."""
import os

import mtf_switch  # noqa: F401  (shim before mesh_tensorflow; registers gin configurables)
import filelock
import gin
import mesh_tensorflow as mtf
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

tf.disable_v2_behavior()


def _shared(tmp_path_factory, name):
  """A directory of this test run, shared by its pytest-xdist workers (pytest.ini runs two)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the run's directory, above each worker's
  path = base / name
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="session")
def binary_env(tmp_path_factory):
  """The environment of the binary runs: one corpus/vocabulary cache for the whole test run (a
  fresh cache trains the default vocabulary first, ~25 s; its files are written atomically)."""
  import binary  # pylint: disable=g-import-not-at-top
  return binary.environment(_shared(tmp_path_factory, "cache"))


@pytest.fixture(scope="session")
def pretrained_switch(binary_env, tmp_path_factory):
  """(environment, model_dir, final loss): a 2-layer switch_tiny pretrained for 40 steps on the
  default corpus through t5_mesh_transformer, shared by the end-to-end tests (trained once per
  test run: the first worker to need it trains, the other waits)."""
  import binary  # pylint: disable=g-import-not-at-top
  root = _shared(tmp_path_factory, "pretrained")
  with filelock.FileLock(str(root / "lock")):
    loss_file = root / "final_loss"
    if not loss_file.exists():
      loss_file.write_text(repr(binary.train(binary_env, root / "switch", binary.SWITCH_GIN, 40,
                                             *binary.SMALL)))
  return binary_env, root / "switch", float(loss_file.read_text())


@pytest.fixture(autouse=True)
def clean_gin():
  """No gin binding leaks from one test into another (e.g. a model file's SwitchFFN.*)."""
  with gin.unlock_config():
    gin.clear_config()
  yield
  with gin.unlock_config():
    gin.clear_config()


def import_input(mesh, x):
  """x [batch, length, d_model] as an mtf tensor; returns it with its three dimensions."""
  b, l, m = x.shape
  dims = [mtf.Dimension("batch", b), mtf.Dimension("length", l), mtf.Dimension("d_model", m)]
  return mtf.import_tf_tensor(mesh, tf.constant(x), mtf.Shape(dims)), dims


def run_switch(layer, x, nonpadding=None, train=False, mesh_shape="", layout="",
               num_devices=1, dtype=tf.float32, seed=0, grads=False, summaries=False):
  """Runs `layer.apply` on x [(outer_batch,) batch, length, d_model]; returns outputs, aux loss
  and the layer's variables by short name (switch_gating, wi..., wo), all as numpy. With
  grads=True also a dict of the gradients of sum(y * r) + loss (r fixed random) with respect to
  each variable and to x ("x"), and the number of all-to-alls the lowering performed. With
  summaries=True also a dict of the scalar summaries (metrics.py) by name."""
  with tf.Graph().as_default():
    return _run_switch(layer, x, nonpadding, train, mesh_shape, layout, num_devices, dtype, seed,
                       grads, summaries)


def _run_switch(layer, x, nonpadding, train, mesh_shape, layout, num_devices, dtype, seed,
                grads, summaries):
  tf.set_random_seed(seed)
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  *batch, l, m = x.shape
  names = ["outer_batch", "batch"][-len(batch):]
  dims = [mtf.Dimension(n, b) for n, b in zip(names, batch)] + [mtf.Dimension("length", l)]
  model_dim = mtf.Dimension("d_model", m)
  mx = mtf.import_tf_tensor(mesh, tf.constant(x, dtype), mtf.Shape(dims + [model_dim]))
  mpad = nonpadding  # None, the int 1 (as transformer.Context gives when decoding) or an array
  if isinstance(nonpadding, np.ndarray):
    mpad = mtf.import_tf_tensor(mesh, tf.constant(nonpadding, dtype), mtf.Shape(dims))
  vdtype = mtf.VariableDType(tf.float32, tf.float32, dtype)
  y, loss = layer.apply(mx, model_dim, train=train, variable_dtype=vdtype, layout=layout,
                        mesh_shape=mesh_shape, nonpadding=mpad)
  variables = {v.name.split("MoE1D/")[1].split("/kernel")[0]: v.outputs[0]
               for v in graph.all_variables}
  if grads:
    r = mtf.import_tf_tensor(mesh, tf.constant(
        np.random.RandomState(seed + 1).randn(*y.shape.to_integer_list), dtype), y.shape)
    objective = mtf.reduce_sum(mtf.cast(y * r, tf.float32)) + mtf.cast(loss, tf.float32)
    grad_of = dict(variables, x=mx)
    grad_list = mtf.gradients([objective], list(grad_of.values()))
  devices = ["cpu:%d" % i for i in range(num_devices)]
  impl = mtf.placement_mesh_impl.PlacementMeshImpl(mesh_shape, layout, devices)
  alltoalls = []
  alltoall = impl.alltoall
  impl.alltoall = lambda *args, **kw: alltoalls.append(args) or alltoall(*args, **kw)
  lowering = mtf.Lowering(graph, {mesh: impl}, autostack=False)  # keep variables by name
  ty = tf.cast(lowering.export_to_tf_tensor(y), tf.float32)
  tloss = tf.cast(lowering.export_to_tf_tensor(loss), tf.float32)
  tvars = {k: lowering.export_to_tf_tensor(v) for k, v in variables.items()}
  fetches = [ty, tloss, tvars]
  if grads:
    fetches.append({k: tf.cast(lowering.export_to_tf_tensor(g), tf.float32)
                    for k, g in zip(grad_of, grad_list)})
  if summaries:
    fetches.append(dict(tf.get_collection(mtf.utils.SCALAR_SUMMARIES_COLLECTION_KEY)))
  config = tf.ConfigProto(device_count={"CPU": num_devices})
  with tf.Session(config=config) as sess:
    sess.run(tf.global_variables_initializer())
    sess.run(lowering.copy_masters_to_slices())
    out = sess.run(fetches)
  out[1] = float(out[1])
  if grads:
    out.insert(4, len(alltoalls))
  return tuple(out)


@pytest.fixture
def rng():
  return np.random.RandomState(0)


def layer_graph(layer, batch, length, d_model=8):
  """The mesh-tensorflow graph of `layer` applied in training to zeros [batch, length, d_model]
  on one device (for tests of which operations a dispatch builds)."""
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  dims = [mtf.Dimension("batch", batch), mtf.Dimension("length", length)]
  model_dim = mtf.Dimension("d_model", d_model)
  with tf.Graph().as_default():
    x = mtf.zeros(mesh, mtf.Shape(dims + [model_dim]))
    layer.apply(x, model_dim, train=True, variable_dtype=mtf.VariableDType(), layout="",
                mesh_shape="")
  return graph


def numpy_examples(make_dataset, n=None):
  """Elements of make_dataset() (the first n) as numpy, via a session: eager mode is disabled
  here, as t5_mesh_transformer does."""
  with tf.Graph().as_default():
    ds = make_dataset()
    if n is not None:
      ds = ds.take(n)
    element = tf.data.make_one_shot_iterator(ds).get_next()
    examples = []
    with tf.Session() as session:
      while True:
        try:
          examples.append(session.run(element))
        except tf.errors.OutOfRangeError:
          return examples

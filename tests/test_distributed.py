"""Layouts over several CPU devices equal the single-device run, and the gather dispatch equals the
einsum dispatch: outputs, balance loss and gradients (float32, 1e-5)."""
import mesh_tensorflow as mtf
import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorflow.python.tpu import tpu_function  # pylint: disable=g-direct-tensorflow-import

from mtf_switch import dispatch as dispatch_lib
from mtf_switch import layers
from conftest import layer_graph
from conftest import run_switch

# name: (x shape, mesh_shape, layout, devices, experts, expects all-to-alls)
LAYOUTS = {
    "data_parallel": ((8, 16, 8), "batch:4", "batch:batch", 4, 8, False),
    "expert_parallel": ((8, 16, 8), "batch:4", "batch:batch,experts:batch", 4, 8, True),
    "expert_parallel_8": ((8, 16, 8), "batch:8", "batch:batch,experts:batch", 8, 8, True),
    "model_parallel": ((8, 16, 8), "model:4", "expert_hidden:model", 4, 8, False),
    "expert_model_data": ((8, 16, 8), "batch:2,model:2",
                          "batch:batch,experts:batch,expert_hidden:model", 4, 8, True),
    # More devices than experts: each of the 2 experts is replicated over `outer_batch`.
    "expert_replication": ((2, 4, 16, 8), "outer_batch:2,batch:2",
                           "outer_batch:outer_batch,batch:batch,experts:batch", 4, 2, True),
}


def _layer(experts, dispatch):
  return layers.SwitchFFN(num_experts=experts, hidden_size=16, group_size=16,
                          capacity_factor_train=0.75, capacity_factor_eval=2.0,
                          min_capacity=1, router_policy="argmax", dispatch=dispatch)


def _assert_same(a, b):
  y_a, loss_a, vars_a, grads_a, _ = a
  y_b, loss_b, vars_b, grads_b, _ = b
  np.testing.assert_allclose(y_a, y_b, rtol=1e-5, atol=1e-6)
  assert loss_a == pytest.approx(loss_b, rel=1e-5)
  for name in vars_a:
    np.testing.assert_array_equal(vars_a[name], vars_b[name])
  assert grads_a.keys() == grads_b.keys()
  for name in grads_a:
    np.testing.assert_allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("dispatch", ["gather", "einsum", "ragged"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_equals_single_device(rng, name, dispatch):
  shape, mesh_shape, layout, devices, experts, expects_alltoall = LAYOUTS[name]
  if dispatch == "ragged" and name != "data_parallel":  # experts split: ragged refuses
    with pytest.raises(ValueError, match="dispatch='ragged' needs every expert's weights"):
      run_switch(_layer(experts, dispatch), np.zeros(shape, np.float32), mesh_shape=mesh_shape,
                 layout=layout, num_devices=devices)
    return
  x = rng.randn(*shape).astype(np.float32)
  nonpadding = np.ones(shape[:-1], np.float32)
  nonpadding[..., -3:] = 0.0
  layer = _layer(experts, dispatch)
  single = run_switch(layer, x, nonpadding, train=True, grads=True)
  multi = run_switch(layer, x, nonpadding, train=True, mesh_shape=mesh_shape, layout=layout,
                     num_devices=devices, grads=True)
  _assert_same(single, multi)
  assert single[-1] == 0
  assert (multi[-1] > 0) == expects_alltoall  # the dispatch resplit lowers to all-to-alls
  assert np.abs(multi[3]["switch_gating"]).max() > 0  # the router is trained through the gate


@pytest.mark.parametrize("activation", [["gelu", "linear"], "relu"])
@pytest.mark.parametrize("dispatch", ["gather", "ragged"])
@pytest.mark.parametrize("train", [True, False])
def test_dispatch_equals_einsum_dispatch(rng, train, dispatch, activation):
  x = rng.randn(4, 16, 8).astype(np.float32)
  nonpadding = np.ones((4, 16), np.float32)
  nonpadding[1, 5:] = 0.0
  layer, reference = _layer(4, dispatch), _layer(4, "einsum")
  layer.activation = reference.activation = activation
  got = run_switch(layer, x, nonpadding, train=train, grads=True)
  _assert_same(got, run_switch(reference, x, nonpadding, train=train, grads=True))
  if train:  # capacity factor 0.75: some tokens overflow and output exactly 0
    assert (np.abs(got[0]).sum(-1) == 0).sum() > nonpadding.size - nonpadding.sum()


def _einsum_shapes(dispatch):
  graph = layer_graph(layers.SwitchFFN(num_experts=4, hidden_size=16, group_size=256,
                                       dispatch=dispatch), 4, 256)
  return [set(op.outputs[0].shape.dimension_names) | {
      n for t in op.inputs for n in t.shape.dimension_names}
          for op in graph.operations if isinstance(op, mtf.ops.EinsumOperation)]


def test_only_einsum_dispatch_has_one_hot_einsums():
  one_hot = {"group", "expert_unsplit", "expert_capacity"}
  assert any(one_hot <= dims for dims in _einsum_shapes("einsum"))
  for dispatch in ("gather", "ragged"):
    assert not any(one_hot <= dims for dims in _einsum_shapes(dispatch))
  # ragged has no capacity slots at all: nothing is computed for empty ones
  assert not any("expert_capacity" in dims for dims in _einsum_shapes("ragged"))


def test_auto_dispatch_off_tpu_and_unknown_names_fail():
  assert dispatch_lib.choose("auto", experts_split=False) == "ragged"
  assert dispatch_lib.choose("auto", experts_split=True) == "gather"
  assert dispatch_lib.choose("einsum", experts_split=True) == "einsum"
  with tpu_function.tpu_shard_context(8):  # as inside TPUEstimator's TPU computation
    assert dispatch_lib.choose("auto", experts_split=False) == "einsum"
  with pytest.raises(ValueError, match="Unknown SwitchFFN.dispatch 'scatter'"):
    layers.SwitchFFN(dispatch="scatter")


def test_xla_auto_clustering_gets_the_gather_dispatch(monkeypatch):
  """XLA cannot compile ragged's data-dependent segment shapes (measured: DenseBincount 'must be
  a compile-time constant' at the first step): auto picks gather, an explicit ragged fails."""
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0 --tf_xla_cpu_global_jit")
  assert dispatch_lib.choose("auto", experts_split=False) == "ragged"
  monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit")
  assert dispatch_lib.choose("auto", experts_split=False) == "gather"
  assert dispatch_lib.choose("einsum", experts_split=False) == "einsum"
  with pytest.raises(ValueError, match="SwitchFFN.dispatch='ragged' cannot run under XLA"):
    dispatch_lib.choose("ragged", experts_split=False)


def test_devices_must_match_the_mesh():
  with pytest.raises(ValueError, match="mesh_shape batch:4 has 4 processors but 8 devices"):
    mtf.placement_mesh_impl.PlacementMeshImpl("batch:4", "batch:batch", ["cpu:0"] * 8)

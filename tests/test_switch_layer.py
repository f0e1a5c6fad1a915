"""The Switch layer against the independent numpy reference, capacity behaviour, bad input."""
import mesh_tensorflow as mtf
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import dispatch
from mtf_switch import layers
from mtf_switch import routing

from conftest import run_switch
from reference import switch_reference


def _layer(**kw):
  args = dict(num_experts=4, hidden_size=16, group_size=8, min_capacity=1, loss_coef=1e-2,
              init_scale=1.0)
  args.update(kw)
  return layers.SwitchFFN(**args)


@pytest.mark.parametrize("activation", [["gelu", "linear"], "relu"])
@pytest.mark.parametrize("train", [False, True])
def test_matches_numpy_reference_with_padding(rng, activation, train):
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.25).astype(np.float32)
  pad[3] = 0.0  # One group entirely padding: excluded from the loss average.
  # Train uses the argmax policy (no jitter) so the math is deterministic; cf 1.0 -> C = 2.
  layer = _layer(activation=activation, router_policy="argmax", capacity_factor_train=1.0,
                 capacity_factor_eval=2.0)
  y, loss, w = run_switch(layer, x, pad, train=train)
  capacity = 2 if train else 4
  ref_y, ref_loss, _ = switch_reference(x, pad, w, num_groups=4, capacity=capacity,
                                     loss_coef=1e-2, geglu=activation != "relu")
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-7, rtol=1e-5)
  assert np.all(y[pad == 0] == 0.0)
  dropped = np.sum((np.abs(y).sum(-1) == 0) & (pad > 0))
  assert (dropped > 0) if train else (dropped == 0)  # C = 2 overflows; C = 4 does not


@pytest.mark.parametrize("dispatch_name", ["einsum", "gather", "ragged"])
def test_a_batch_of_padding_only(rng, dispatch_name):
  """Evaluation pads its last batch with empty examples: no token reaches an expert."""
  x = rng.randn(2, 8, 12).astype(np.float32)
  y, loss, _ = run_switch(_layer(dispatch=dispatch_name), x, np.zeros((2, 8), np.float32))
  assert np.all(y == 0.0) and loss == 0.0


def test_nonpadding_one_means_no_padding(rng):
  x = rng.randn(2, 8, 12).astype(np.float32)
  y_none, loss_none, _ = run_switch(_layer(), x, None)
  y_one, loss_one, _ = run_switch(_layer(), x, 1)
  np.testing.assert_array_equal(y_one, y_none)
  assert loss_one == loss_none


def test_bfloat16_activations_keep_a_float32_router(rng):
  x = rng.randn(4, 8, 12).astype(np.float32)
  layer = _layer(router_policy="argmax")
  y, _, w = run_switch(layer, x, dtype=tf.bfloat16)
  ref_y, _, _ = switch_reference(x, None, w, num_groups=4, capacity=4, loss_coef=1e-2)
  np.testing.assert_allclose(y, ref_y, atol=0.1, rtol=0.05)  # bfloat16 experts
  with tf.Graph().as_default():
    mesh = mtf.Mesh(mtf.Graph(), "mesh")
    x_bf16 = mtf.zeros(mesh, mtf.Shape([mtf.Dimension("group", 8), mtf.Dimension("d", 12)]),
                       tf.bfloat16)
    experts = mtf.Dimension("experts", 4)
    logits = routing.router_logits(x_bf16, experts, "input_jitter", 1e-2, 0.1, True,
                                   mtf.VariableDType(tf.float32, tf.float32, tf.bfloat16), None,
                                   name="router")
    out = routing.top_k_router(logits, experts, 2)
  assert out.router_logits.dtype == out.router_probs.dtype == tf.float32
  assert all(c.gate.dtype == tf.float32 for c in out.choices)


def test_variables_match_moe1d_names_and_shapes(rng):
  x = rng.randn(2, 8, 12).astype(np.float32)
  _, _, w = run_switch(_layer(), x)
  assert {k: v.shape for k, v in w.items()} == {
      "switch_gating": (12, 4), "wi_0": (4, 12, 16), "wi_1": (4, 12, 16), "wo": (4, 16, 12)}


def test_init_scale_sets_truncated_normal_std(rng):
  x = rng.randn(2, 8, 64).astype(np.float32)
  _, _, w = run_switch(_layer(hidden_size=256, init_scale=0.1), x)
  # truncated normal (2 sigma) has std 0.8796 * sigma; sigma = sqrt(s / fan_in)
  np.testing.assert_allclose(w["wi_0"].std(), 0.8796 * np.sqrt(0.1 / 64), rtol=0.03)
  np.testing.assert_allclose(w["wo"].std(), 0.8796 * np.sqrt(0.1 / 256), rtol=0.03)


def test_capacity_keeps_first_come_tokens_and_zeroes_overflow(rng):
  # One expert: every token routes to it; capacity C = int(8 * 0.5 / 1) = 4 per group of 8.
  x = rng.randn(2, 8, 12).astype(np.float32)
  layer = _layer(num_experts=1, capacity_factor_eval=0.5)
  y, _, w = run_switch(layer, x)
  assert np.all(np.abs(y[:, :4]).sum(-1) > 0)
  assert np.all(y[:, 4:] == 0.0)
  ref_y, _, _ = switch_reference(x, None, w, num_groups=2, capacity=4, loss_coef=1e-2)
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)


def test_balance_loss_is_alpha_for_uniform_routing():
  # A zero router gives p_i = 1/E; ties route every token to expert 0: f = (1, 0, ...),
  # so N * sum_i f_i P_i = N * 1/N = 1 -> loss == alpha.
  x = np.zeros((2, 8, 12), np.float32)
  _, loss, _ = run_switch(_layer(loss_coef=0.01), x)
  np.testing.assert_allclose(loss, 0.01, rtol=1e-6)


def test_capacity_formula():
  assert dispatch.expert_capacity(1024, 128, 1.25, 4) == 10
  assert dispatch.expert_capacity(1024, 128, 2.0, 4) == 16
  assert dispatch.expert_capacity(16, 8, 1.0, 4) == 4  # min_capacity wins
  assert dispatch.expert_capacity(16, 2, 4.0, 0) == 16  # never more than the group size


def test_groups_split_over_mesh_axis():
  assert dispatch.split_into_groups(4096, 1024, 1) == (4, 1024)
  assert dispatch.split_into_groups(4096, 1024, 8) == (8, 512)
  assert dispatch.split_into_groups(96, 64, 4) == (4, 24)


def test_error_tokens_not_divisible_by_mesh_axis():
  with pytest.raises(ValueError, match="SwitchFFN.group_size.*|mesh_shape"):
    dispatch.split_into_groups(30, 8, 4)


def test_error_groups_do_not_divide_mesh_axis_in_graph(rng):
  x = rng.randn(3, 6, 12).astype(np.float32)
  with pytest.raises(ValueError, match="cannot be split into groups"):
    run_switch(_layer(), x, mesh_shape="batch:4", layout="batch:batch;experts:batch",
               num_devices=4)


def test_error_experts_not_divisible_by_mesh_axis(rng):
  x = rng.randn(4, 8, 12).astype(np.float32)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 4-way"):
    run_switch(_layer(num_experts=6), x, mesh_shape="batch:4",
               layout="batch:batch;experts:batch", num_devices=4)


def test_error_capacity_rounds_to_zero(rng):
  x = rng.randn(2, 8, 12).astype(np.float32)
  with pytest.raises(ValueError, match="capacity rounds to 0"):
    run_switch(_layer(num_experts=4, capacity_factor_eval=0.1, min_capacity=0), x)


def test_error_unknown_router_policy():
  with pytest.raises(ValueError, match="Unknown router policy 'top2'.*argmax, input_jitter"):
    _layer(router_policy="top2")


def test_expert_parallel_mesh_matches_single_device(rng):
  # 4 logical CPU devices, groups and experts both split over the `batch` mesh axis (the
  # reshape between them lowers to an all-to-all): same outputs and loss as one device.
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.2).astype(np.float32)
  layer = _layer(num_experts=8, router_policy="argmax")
  y1, loss1, w1 = run_switch(layer, x, pad)
  y4, loss4, w4 = run_switch(layer, x, pad, mesh_shape="batch:4",
                             layout="batch:batch;experts:batch", num_devices=4)
  for name in w1:
    np.testing.assert_array_equal(w1[name], w4[name])
  np.testing.assert_allclose(y4, y1, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6)


def _same_for_every_expert(shape, dtype=tf.float32, partition_info=None):
  """Weights [experts, in, out] equal for every expert, distinct within one (so that two
  dropout masks keeping as many units still give different outputs)."""
  del partition_info
  one = np.linspace(0.5, 1.5, shape[1] * shape[2]).reshape(shape[1:])
  return tf.constant(np.tile(one, [shape[0], 1, 1]), dtype)


def test_ragged_expert_dropout_draws_its_own_mask_per_expert():
  """Two identical tokens sent to two experts of identical weights, in training: equal outputs
  without expert dropout, different ones with it (each expert draws its own mask)."""
  from mtf_switch import experts  # pylint: disable=g-import-not-at-top
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(1)
    mesh = mtf.Mesh(mtf.Graph(), "mesh")
    grouped = [mtf.Dimension("outer_batch", 1), mtf.Dimension("batch", 1),
               mtf.Dimension("group", 2)]
    tokens = mtf.import_tf_tensor(mesh, tf.ones([1, 1, 2, 16]),
                                  mtf.Shape(grouped + [mtf.Dimension("d_model", 16)]))
    ids = mtf.import_tf_tensor(mesh, tf.constant([[[[0], [1]]]], tf.int32),
                               mtf.Shape(grouped + [mtf.Dimension("choices", 1)]))
    outputs = []
    for rate in (0.0, 0.5):
      with tf.variable_scope("rate_%g" % rate):
        outputs.append(experts.ragged_expert_ffn(
            tokens, ids, mtf.Dimension("experts", 2), mtf.Dimension("expert_hidden", 64),
            mtf.Dimension("d_model", 16), "relu", rate, True,
            mtf.VariableDType(tf.float32, tf.float32, tf.float32),
            lambda *_: _same_for_every_expert,
            shard_dims=[mtf.Dimension("outer_batch", 1), mtf.Dimension("batch", 1)]))
    lowering = mtf.Lowering(mesh.graph, {mesh: mtf.placement_mesh_impl.PlacementMeshImpl(
        "", "", [""])})
    results = [lowering.export_to_tf_tensor(y) for y in outputs]
    with tf.Session() as session:
      session.run(tf.global_variables_initializer())
      session.run(lowering.copy_masters_to_slices())
      plain, dropped = session.run(results)
  np.testing.assert_array_equal(plain[0, 0, 0], plain[0, 0, 1])
  assert not np.array_equal(dropped[0, 0, 0], dropped[0, 0, 1])

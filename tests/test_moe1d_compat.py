"""Layer-level interchangeability with mesh-tensorflow's MoE1D(moe_gating="switch", "top_2",
"ntlb", "switch_max", "expert_selection").

The same variables (by name) are fed to both layers, in both directions: a MoE1D checkpoint read
by SwitchFFN and a SwitchFFN checkpoint read by MoE1D give identical outputs (bit for bit with
SwitchFFN's einsum dispatch, MoE1D's algorithm; to float32 rounding with gather or ragged).
"""
import types

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import moe
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import layers

from conftest import import_input

E, HIDDEN, GROUP = 4, 16, 8


def _context(length, model_dim, nonpadding, train):
  model = types.SimpleNamespace(ensemble_dim=None, model_dim=model_dim, layout="",
                                mesh_shape="", autoregressive=False)
  return types.SimpleNamespace(
      model=model, train=train, length_dim=length, nonpadding=nonpadding, losses=[],
      mode=tf.estimator.ModeKeys.TRAIN if train else tf.estimator.ModeKeys.EVAL,
      variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.float32),
      num_microbatches=None, input_embeddings=None)


# MoE1D's gatings and the SwitchFFN bindings that compute the same routing (deterministic:
# no jitter, second experts by threshold).
GATINGS = {
    "switch": ({}, {}),
    "top_2": (dict(second_policy_train="threshold", second_policy_eval="threshold",
                   second_threshold_train=0.3, second_threshold_eval=0.3),
              dict(num_selected_experts=2, second_policy_train="threshold",
                   second_policy_eval="threshold", second_threshold=0.3)),
    "ntlb": (dict(ntlb_top_k=3), dict(no_token_left_behind=3)),
    "switch_max": ({}, dict(router="switch_max")),
    "expert_selection": ({}, dict(router="expert_choice")),
}


def _run(layer_cls, x, pad, train, ckpt_in=None, ckpt_out=None, dispatch="einsum",
         gating="switch", min_capacity=4):
  """Builds one layer in scope layer_000/<class name> (as LayerStack does) and runs it."""
  with tf.Graph().as_default():
    tf.set_random_seed(1)
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    mx, (batch, length, model_dim) = import_input(mesh, x)
    mpad = mtf.import_tf_tensor(mesh, tf.constant(pad), mtf.Shape([batch, length]))
    ctx = _context(length, model_dim, mpad, train)
    if layer_cls is moe.MoE1D:
      layer = moe.MoE1D(num_experts=E, hidden_size=HIDDEN, group_size=GROUP,
                        moe_gating=gating, activation=["gelu", "linear"],
                        switch_policy_train="argmax", switch_policy_eval="argmax",
                        min_expert_capacity=min_capacity, **GATINGS[gating][0])
    else:
      layer = layers.SwitchFFN(num_experts=E, hidden_size=HIDDEN, group_size=GROUP,
                               router_policy="argmax", min_capacity=min_capacity,
                               dispatch=dispatch,
                               **GATINGS[gating][1])
    with tf.variable_scope("layer_000"), tf.variable_scope(layer_cls.__name__):
      y = layer.call(ctx, mx)
    impl = mtf.placement_mesh_impl.PlacementMeshImpl("", "", [""])
    lowering = mtf.Lowering(graph, {mesh: impl})
    ty = lowering.export_to_tf_tensor(y)
    tloss = lowering.export_to_tf_tensor(ctx.losses[0])
    names = sorted(v.name for v in graph.all_variables)
    saver = tf.train.Saver()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      if ckpt_in:
        saver.restore(sess, ckpt_in)
      sess.run(lowering.copy_masters_to_slices())
      out = sess.run([ty, tloss])
      if ckpt_out:
        saver.save(sess, ckpt_out)
  return out[0], float(out[1]), names


@pytest.mark.parametrize("writer,reader", [(moe.MoE1D, layers.SwitchFFN),
                                           (layers.SwitchFFN, moe.MoE1D)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dispatch", ["einsum", "gather", "ragged"])
def test_checkpoint_interchange_gives_identical_outputs(tmp_path, writer, reader, train,
                                                        dispatch):
  rng = np.random.RandomState(3)
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.2).astype(np.float32)
  ckpt = str(tmp_path / "model.ckpt")
  y_w, _, names_w = _run(writer, x, pad, train, ckpt_out=ckpt, dispatch=dispatch)
  y_r, _, names_r = _run(reader, x, pad, train, ckpt_in=ckpt, dispatch=dispatch)
  assert names_w == names_r == ["layer_000/MoE1D/switch_gating/kernel",
                                "layer_000/MoE1D/wi_0/kernel", "layer_000/MoE1D/wi_1/kernel",
                                "layer_000/MoE1D/wo/kernel"]
  assert np.abs(y_w).max() > 0
  if dispatch == "einsum":
    np.testing.assert_array_equal(y_w, y_r)
  else:
    np.testing.assert_allclose(y_w, y_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gating", ["top_2", "ntlb"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dispatch", ["einsum", "gather", "ragged"])
def test_moe1d_top2_and_ntlb_checkpoints_give_identical_outputs(tmp_path, gating, train,
                                                                 dispatch):
  rng = np.random.RandomState(5)
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.2).astype(np.float32)
  ckpt = str(tmp_path / "model.ckpt")
  y_m, loss_m, names_m = _run(moe.MoE1D, x, pad, train, ckpt_out=ckpt, gating=gating)
  y_s, _, names_s = _run(layers.SwitchFFN, x, pad, train, ckpt_in=ckpt, dispatch=dispatch,
                         gating=gating)
  assert names_m == names_s and names_m[0] == "layer_000/MoE1D/%s_gating/kernel" % gating
  assert np.abs(y_m).max() > 0
  if dispatch == "einsum":
    np.testing.assert_array_equal(y_s, y_m)
  else:
    np.testing.assert_allclose(y_s, y_m, rtol=1e-5, atol=1e-6)
  if gating == "top_2":  # same balance loss without padding (MoE1D counts padding in f_i)
    no_pad = np.ones_like(pad)
    _, loss_m, _ = _run(moe.MoE1D, x, no_pad, train, ckpt_in=ckpt, gating=gating)
    _, loss_s, _ = _run(layers.SwitchFFN, x, no_pad, train, ckpt_in=ckpt, gating=gating)
    np.testing.assert_allclose(loss_s, loss_m, rtol=1e-6)


def test_balance_loss_differs_from_moe1d_only_through_padding(tmp_path):
  rng = np.random.RandomState(4)
  x = rng.randn(4, 8, 12).astype(np.float32)
  ckpt = str(tmp_path / "model.ckpt")
  no_pad = np.ones((4, 8), np.float32)
  _, loss_m, _ = _run(moe.MoE1D, x, no_pad, True, ckpt_out=ckpt)
  _, loss_s, _ = _run(layers.SwitchFFN, x, no_pad, True, ckpt_in=ckpt)
  np.testing.assert_allclose(loss_s, loss_m, rtol=1e-6)
  pad = no_pad.copy()
  pad[:, 5:] = 0.0
  _, loss_m, _ = _run(moe.MoE1D, x, pad, True, ckpt_in=ckpt)
  _, loss_s, _ = _run(layers.SwitchFFN, x, pad, True, ckpt_in=ckpt)
  assert abs(loss_s - loss_m) > 1e-4 * loss_s  # MoE1D counts padding in f_i.


@pytest.mark.parametrize("gating", ["switch_max", "expert_selection"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dispatch", ["einsum", "gather", "ragged"])
def test_moe1d_switch_max_and_expert_selection_checkpoints_give_identical_outputs(
    tmp_path, gating, train, dispatch):
  """Both directions; the balance loss too for expert_selection (MoE1D's own formula, which
  excludes padding); switch_max's counts padding in f_i, as MoE1D's switch does."""
  rng = np.random.RandomState(6)
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.2).astype(np.float32)
  pad[3, 2:] = 0.0  # a group with fewer real tokens than the capacity
  # C = int(S cf / E) = 2 in training (tokens overflow switch_max's experts; expert choice
  # leaves tokens without an expert), 4 in evaluation (expert choice gives some several).
  kw = dict(gating=gating, min_capacity=1)
  ckpt, back = str(tmp_path / "moe1d.ckpt"), str(tmp_path / "switch.ckpt")
  y_m, loss_m, names_m = _run(moe.MoE1D, x, pad, train, ckpt_out=ckpt, **kw)
  y_s, loss_s, names_s = _run(layers.SwitchFFN, x, pad, train, ckpt_in=ckpt, ckpt_out=back,
                              dispatch=dispatch, **kw)
  y_back, _, _ = _run(moe.MoE1D, x, pad, train, ckpt_in=back, **kw)
  if train:  # some real tokens get only the residual
    assert (np.abs(y_m).sum(-1)[pad > 0] == 0).any()
  assert names_m == names_s and names_m[0] == "layer_000/MoE1D/%s_gating/kernel" % gating
  assert np.abs(y_m).max() > 0
  np.testing.assert_array_equal(y_back, y_m)
  if dispatch == "einsum":
    np.testing.assert_array_equal(y_s, y_m)
  else:
    np.testing.assert_allclose(y_s, y_m, rtol=1e-5, atol=1e-6)
  if gating == "expert_selection":
    np.testing.assert_allclose(loss_s, loss_m, rtol=1e-6)

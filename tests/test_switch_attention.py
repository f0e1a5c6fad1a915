"""Experimental Switch attention (Switch paper App. A): with one expert per projection every gate
is 1, so it must equal dense self-attention with the same projection matrices."""
import types

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import transformer_layers
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import attention

from conftest import import_input


def _run(layer, x, train):
  with tf.Graph().as_default():
    tf.set_random_seed(0)
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    mx, (batch, length, model_dim) = import_input(mesh, x)
    model = types.SimpleNamespace(ensemble_dim=None, ensemble_dims=[], model_dim=model_dim,
                                  layout="", mesh_shape="", autoregressive=False,
                                  max_length=length.size)
    context = transformer.Context(
        model, mesh, [batch], length, mtf.VariableDType(tf.float32, tf.float32, tf.float32),
        mode=tf.estimator.ModeKeys.TRAIN if train else tf.estimator.ModeKeys.EVAL,
        position=mtf.range(mesh, length, tf.int32), losses=[])
    with tf.variable_scope("layer_000"):
      y = layer.call(context, mx)
    lowering = mtf.Lowering(graph, {mesh: mtf.placement_mesh_impl.PlacementMeshImpl("", "",
                                                                                   [""])})
    ty = lowering.export_to_tf_tensor(y)
    tvars = {v.name: lowering.export_to_tf_tensor(v.outputs[0]) for v in graph.all_variables}
    tloss = [lowering.export_to_tf_tensor(l) for l in context.losses]
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(lowering.copy_masters_to_slices())
      return sess.run([ty, tvars, tloss])


def _numpy_attention(x, wq, wk, wv, wo, heads):
  b, l, _ = x.shape
  def split(t):
    return t.reshape(b, l, heads, -1).transpose(0, 2, 1, 3)
  q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
  logits = q @ k.transpose(0, 1, 3, 2)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return (w @ v).transpose(0, 2, 1, 3).reshape(b, l, -1) @ wo


@pytest.mark.parametrize("train", [False, True])
def test_one_expert_equals_dense_attention(train):
  x = np.random.RandomState(0).randn(2, 8, 16).astype(np.float32)
  layer = attention.SwitchSelfAttention(num_experts=1, group_size=8, router_policy="argmax",
                                        num_heads=2, key_value_size=4)
  y, variables, losses = _run(layer, x, train)
  w = {name.split("/")[1]: value for name, value in variables.items()
       if name.endswith("/w/kernel")}
  wo = variables["layer_000/o"]
  scale = 4 ** -0.5
  ref = _numpy_attention(x, w["q"][0] * scale, w["k"][0], w["v"][0], wo, heads=2)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  assert len(losses) == 3  # one balance loss per projection
  assert sorted(n for n in variables if "gating" in n) == [
      "layer_000/%s/MoE1D/switch_gating/kernel" % p for p in "kqv"]


def test_experts_route_tokens_differently():
  x = np.random.RandomState(1).randn(2, 8, 16).astype(np.float32)
  layer = attention.SwitchSelfAttention(num_experts=4, group_size=8, router_policy="argmax",
                                        capacity_factor_eval=4.0, num_heads=2,
                                        key_value_size=4)
  y, variables, _ = _run(layer, x, train=False)
  assert np.isfinite(y).all() and np.abs(y).max() > 0
  assert variables["layer_000/q/MoE1D/w/kernel"].shape == (4, 16, 8)


def test_unsupported_attention_options():
  with pytest.raises(ValueError, match="shared_kv=False"):
    attention.SwitchSelfAttention(shared_kv=True)
  assert issubclass(attention.SwitchSelfAttention, transformer_layers.SelfAttention)

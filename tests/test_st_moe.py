"""ST-MoE routing variants and losses against the independent numpy reference: top-k, batch-
prioritized routing, no-token-left-behind, router z-loss, multiplicative bias; their errors."""
import types

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer_layers
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import layers
from mtf_switch import stacks

from conftest import run_switch
from reference import router_weights
from reference import switch_reference

# Train-mode routing without jitter, cf 1.0: C = int(8 * 1.0 / 4) = 2 of 8 tokens per group.
BASE = dict(num_experts=4, hidden_size=16, group_size=8, min_capacity=1, init_scale=1.0,
            router_policy="argmax", capacity_factor_train=1.0, loss_coef=1e-2)
VARIANTS = {
    "top1": dict(),
    "top2_all": dict(num_selected_experts=2, second_policy_train="all"),
    "top2_threshold": dict(num_selected_experts=2, second_policy_train="threshold",
                           second_threshold=0.3),
    "top3": dict(num_selected_experts=3, second_policy_train="all"),
    "bpr": dict(batch_prioritized_routing=True),
    "bpr_top2": dict(batch_prioritized_routing=True, num_selected_experts=2,
                     second_policy_train="all"),
    "ntlb": dict(no_token_left_behind=3),
    "z_loss": dict(router_z_loss_coef=1e-3),
    "bias": dict(multiplicative_bias=True, num_selected_experts=2, second_policy_train="all"),
}


def _reference_args(variant):
  kw = VARIANTS[variant]
  threshold = kw.get("second_threshold") if kw.get("second_policy_train") == "threshold" \
      else None
  return dict(k=kw.get("num_selected_experts", 1), second_threshold=threshold,
              bpr=kw.get("batch_prioritized_routing", False),
              ntlb=kw.get("no_token_left_behind", 0), z_coef=kw.get("router_z_loss_coef", 0.0))


def _data(seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.2).astype(np.float32)
  return x, pad


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dispatch", ["einsum", "gather", "ragged"])
def test_variant_matches_numpy_reference(variant, dispatch):
  x, pad = _data()
  layer = layers.SwitchFFN(dispatch=dispatch, **BASE, **VARIANTS[variant])
  y, loss, w = run_switch(layer, x, pad, train=True)
  ref_y, ref_loss, dropped = switch_reference(x, pad, w, num_groups=4, capacity=2,
                                              loss_coef=1e-2, **_reference_args(variant))
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-7, rtol=1e-5)
  assert dropped > 0 or variant.startswith("top") or variant == "ntlb"
  assert np.all(y[pad == 0] == 0.0)


def test_router_kernel_takes_mesh_tensorflow_scope_names():
  x, _ = _data()
  names = {}
  for kw in [dict(), dict(num_selected_experts=2), dict(num_selected_experts=3),
             dict(no_token_left_behind=2)]:
    _, _, w = run_switch(layers.SwitchFFN(**BASE, **kw), x)
    names[tuple(kw.items())] = [k for k in w if k.endswith("_gating")]
  assert list(names.values()) == [["switch_gating"], ["top_2_gating"], ["top_n_gating"],
                                  ["ntlb_gating"]]


def test_z_loss_is_independent_of_the_balance_coefficient():
  x, pad = _data(1)
  results = {}
  for c_b, c_z in [(1e-2, 0.0), (0.0, 1e-3), (1e-2, 1e-3)]:
    layer = layers.SwitchFFN(**dict(BASE, loss_coef=c_b, router_z_loss_coef=c_z))
    _, loss, w = run_switch(layer, x, pad, train=True)
    results[c_b, c_z] = loss
  # L_z by hand: mean over real tokens of logsumexp(x W_r)^2
  logits = x.reshape(-1, 12)[pad.reshape(-1) > 0].astype(np.float64) @ router_weights(w)
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  np.testing.assert_allclose(results[0.0, 1e-3], 1e-3 * z, rtol=1e-5)
  np.testing.assert_allclose(results[1e-2, 1e-3], results[1e-2, 0.0] + 1e-3 * z, rtol=1e-5)


def test_bpr_keeps_the_most_confident_tokens():
  x, pad = _data(2)
  layer = layers.SwitchFFN(**dict(BASE, batch_prioritized_routing=True))
  y, _, w = run_switch(layer, x, pad, train=True)
  tokens = x.reshape(4, 8, 12).astype(np.float64)
  logits = tokens @ router_weights(w)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  kept = np.abs(y).reshape(4, 8, 12).sum(-1) > 0
  real = pad.reshape(4, 8) > 0
  checked = 0
  for g in range(4):
    for e in range(4):
      mine = real[g] & (probs[g].argmax(-1) == e)
      if (mine & ~kept[g]).any():
        top = probs[g].max(-1)
        assert top[mine & kept[g]].min() > top[mine & ~kept[g]].max()
        assert (mine & kept[g]).sum() == 2  # the expert is full
        checked += 1
  assert checked > 0


def test_no_token_left_behind_drops_fewer_tokens_than_top1():
  x, pad = _data(3)
  dropped = {}
  for name in ("top1", "ntlb"):
    y, _, _ = run_switch(layers.SwitchFFN(**BASE, **VARIANTS[name]), x, pad, train=True)
    dropped[name] = int(np.sum((np.abs(y).sum(-1) == 0) & (pad > 0)))
  assert dropped["ntlb"] < dropped["top1"]


@pytest.mark.parametrize("dispatch", ["gather", "ragged"])
def test_top2_with_bias_and_bpr_gradients_match_einsum(dispatch):
  x, pad = _data(4)
  kw = dict(BASE, num_selected_experts=2, second_policy_train="all", multiplicative_bias=True,
            batch_prioritized_routing=True, router_z_loss_coef=1e-3)
  ref = run_switch(layers.SwitchFFN(dispatch="einsum", **kw), x, pad, train=True, grads=True)
  out = run_switch(layers.SwitchFFN(dispatch=dispatch, **kw), x, pad, train=True, grads=True)
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
  assert set(out[3]) == set(ref[3]) >= {"multiplicative_bias", "top_2_gating", "x"}
  for name in ref[3]:
    np.testing.assert_allclose(out[3][name], ref[3][name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert np.abs(ref[3]["multiplicative_bias"]).max() > 0


def test_top2_bpr_expert_parallel_matches_single_device():
  x, pad = _data(5)
  kw = dict(BASE, num_experts=8, num_selected_experts=2, second_policy_train="all",
            batch_prioritized_routing=True, dispatch="gather")
  one = run_switch(layers.SwitchFFN(**kw), x, pad, train=True, grads=True)
  four = run_switch(layers.SwitchFFN(**kw), x, pad, train=True, grads=True,
                    mesh_shape="batch:4", layout="batch:batch;experts:batch", num_devices=4)
  np.testing.assert_allclose(four[0], one[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(four[1], one[1], rtol=1e-5)
  for name in one[3]:
    np.testing.assert_allclose(four[3][name], one[3][name], rtol=1e-5, atol=1e-6)
  assert four[4] > 0 == one[4]  # all-to-alls


def test_bpr_in_a_decoder_is_an_error():
  layer = layers.SwitchFFN(batch_prioritized_routing=True)
  context = types.SimpleNamespace(model=types.SimpleNamespace(ensemble_dim=None,
                                                              autoregressive=True))
  with pytest.raises(ValueError, match="encoders only.*encoder/SwitchFFN"):
    layer.call(context, None)


@pytest.mark.parametrize("kw,match", [
    (dict(num_selected_experts=5), "num_selected_experts must be between 1 and num_experts=4"),
    (dict(no_token_left_behind=1), "no_token_left_behind must be 0"),
    (dict(no_token_left_behind=2, num_selected_experts=2), "cannot be combined"),
    (dict(second_policy_eval="sometimes"), "Unknown second-expert policy 'sometimes'"),
])
def test_bad_routing_bindings_are_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    layers.SwitchFFN(num_experts=4, **kw)


def test_selective_precision_keeps_the_router_in_float32():
  """Switch paper Table 2 / ST-MoE: with bfloat16 activations, router logits, softmax, z-loss and
  balance loss are float32; dispatch/combine tensors are cast back to bfloat16."""
  with tf.Graph().as_default():
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    dims = [mtf.Dimension("batch", 4), mtf.Dimension("length", 8)]
    model_dim = mtf.Dimension("d_model", 12)
    x = mtf.zeros(mesh, mtf.Shape(dims + [model_dim]), tf.bfloat16)
    layer = layers.SwitchFFN(**dict(BASE, num_selected_experts=2, router_z_loss_coef=1e-3,
                                    dispatch="einsum"))
    y, loss = layer.apply(x, model_dim, train=True,
                          variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.bfloat16))
  assert y.dtype == loss.dtype == tf.bfloat16
  ops = graph.operations
  router = [op for op in ops if "top_2_gating" in op.name and op.outputs]
  softmax = [op for op in ops if type(op).__name__ == "SoftmaxOperation"
             or "softmax" in op.name.lower()]
  z = [op for op in ops if type(op).__name__ == "ReduceOperation" and "logsumexp" in op.name]
  assert router and softmax and z
  for op in router + softmax + z:
    assert all(t.dtype == tf.float32 for t in op.outputs), op.name
  einsums = [op for op in ops if isinstance(op, mtf.ops.EinsumOperation)]
  # the einsums that move or transform activations: dispatch, wi_0, wi_1, wo, combine
  expert_side = [op for op in einsums if {"expert_capacity", "d_model"} <=
                 {d.name for t in op.inputs + op.outputs for d in t.shape.dims}]
  assert len(expert_side) >= 4
  for op in expert_side:
    assert all(t.dtype == tf.bfloat16 for t in op.inputs + op.outputs), op.name


@pytest.mark.parametrize("decoder,every,extra,expected", [
    (False, 2, "none", "A D A S"),
    (False, 1, "none", "A S"),
    (True, 2, "none", "A X D A X S"),
    (False, 4, "after", "A D A D A D A S D"),
    (True, 4, "before", "A X D A X D A X D A X D S"),
])
def test_sparse_block_layers(decoder, every, extra, expected):
  letters = {transformer_layers.SelfAttention: "A", transformer_layers.EncDecAttention: "X",
             transformer_layers.DenseReluDense: "D", layers.SwitchFFN: "S"}
  block = stacks.sparse_block(decoder=decoder, sparse_every=every, extra_dense_ffn=extra)
  assert " ".join(letters[cls] for cls in block) == expected


@pytest.mark.parametrize("kw,match", [(dict(sparse_every=0), "sparse_every must be >= 1"),
                                      (dict(extra_dense_ffn="middle"), "'middle'; choose one")])
def test_sparse_block_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    stacks.sparse_block(**kw)


@pytest.mark.parametrize("variant", ["top1", "top2_threshold", "ntlb"])
def test_summaries_count_dropped_requests(variant):
  x, pad = _data(6)
  layer = layers.SwitchFFN(**BASE, **VARIANTS[variant])
  _, _, w, values = run_switch(layer, x, pad, train=True, summaries=True)
  _, _, dropped = switch_reference(x, pad, w, num_groups=4, capacity=2, loss_coef=1e-2,
                                   **_reference_args(variant))
  fractions = [values["switch/MoE1D/expert_fraction/%d" % i] for i in range(4)]
  np.testing.assert_allclose(sum(fractions), 1.0 - values["switch/MoE1D/dropped_fraction"],
                             atol=1e-6)
  np.testing.assert_allclose(values["switch/MoE1D/unrouted_fraction"], dropped / pad.sum(),
                             atol=1e-6)
  if variant != "top2_threshold":  # one request per real token
    np.testing.assert_allclose(values["switch/MoE1D/dropped_fraction"], dropped / pad.sum(),
                               atol=1e-6)
  else:
    assert values["switch/MoE1D/dropped_fraction"] > values["switch/MoE1D/unrouted_fraction"]
  assert 0.0 < values["switch/MoE1D/router_entropy"] <= np.log(4)
  assert set(values) >= {"switch/MoE1D/%s" % n for n in ("balance_loss", "z_loss", "top1_gate")}

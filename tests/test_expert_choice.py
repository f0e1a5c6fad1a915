"""Expert-choice routing (SwitchFFN.router = "expert_choice": Zhou et al. 2022, MoE1D's
expert_selection) and switch_max (MoE1D's top-1 with batch-prioritized routing) against the
independent numpy references of tests/reference.py: outputs, gates, capacity, balance loss,
padding never chosen, the routing summaries, every dispatch, the layouts of test_distributed.py,
bad input and the counter. (MoE1D interchange: tests/test_moe1d_compat.py and the binary test
at the end.)"""
import json
import os
import types

import gin
import mesh_tensorflow as mtf
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import count
from mtf_switch import layers
from mtf_switch import report

import binary
import reference
from conftest import layer_graph
from conftest import run_switch
from test_distributed import LAYOUTS, _assert_same

E, S = 4, 8


def _layer(router="expert_choice", **kw):
  args = dict(num_experts=E, hidden_size=16, group_size=S, capacity_factor_train=1.0,
              capacity_factor_eval=2.0, min_capacity=1, router_policy="argmax", router=router)
  args.update(kw)
  return layers.SwitchFFN(**args)


def _inputs(rng, batch=4):
  x = rng.randn(batch, S, 12).astype(np.float32)
  pad = (rng.rand(batch, S) > 0.2).astype(np.float32)
  pad[-1, 3:] = 0.0  # 3 real tokens: fewer than C = 4 (cf 2.0)
  return x, pad


def _summary(values, name):
  (value,) = [v for k, v in values.items() if k.endswith("/" + name)]
  return value


@pytest.mark.parametrize("dispatch", ["einsum", "gather", "ragged"])
@pytest.mark.parametrize("softmax", ["tokens", "experts"])
@pytest.mark.parametrize("train", [True, False])
def test_expert_choice_matches_reference(rng, train, softmax, dispatch):
  """C = int(S cf / E): 2 in training (tokens left without an expert), 4 in evaluation (tokens
  with several); the same outputs, loss, and counts of tokens with none / several experts."""
  x, pad = _inputs(rng)
  layer = _layer(expert_choice_softmax=softmax, dispatch=dispatch, router_z_loss_coef=1e-3)
  y, loss, w, values = run_switch(layer, x, pad, train=train, summaries=True)
  capacity = 2 if train else 4
  ref_y, ref_loss, reached = reference.expert_choice_reference(
      x, pad, w, 4, capacity, 1e-2, softmax, z_coef=1e-3)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  assert np.all(reached[pad == 0] == 0) and np.all(y[pad == 0] == 0)  # padding never chosen
  # each expert takes C real tokens of each group, all of them when the group has fewer
  real = pad.sum(1)
  assert reached.sum() == np.minimum(real, capacity).sum() * E
  if train:
    assert (reached[pad > 0] == 0).any()
    assert np.all(np.abs(y).sum(-1)[(reached == 0) & (pad > 0)] == 0)  # residual only
    n = pad.sum()
    assert _summary(values, "unrouted_fraction") == pytest.approx(
        ((reached == 0) & (pad > 0)).sum() / n)
    assert _summary(values, "multi_expert_fraction") == pytest.approx((reached > 1).sum() / n)
    assert _summary(values, "dropped_fraction") == 0.0
    fractions = [_summary(values, "expert_fraction/%d" % i) for i in range(E)]
    np.testing.assert_allclose(fractions, np.minimum(real, capacity).sum() /
                               reached.sum(), rtol=1e-6)
  else:
    assert (reached > 1).any()


@pytest.mark.parametrize("softmax", ["tokens", "experts"])
def test_expert_choice_router_gradient_matches_finite_differences_of_the_reference(rng,
                                                                                   softmax):
  """d(sum(y * r) + loss)/dW_r: the gates (and the balance loss) train the router."""
  x, pad = _inputs(rng)
  layer = _layer(expert_choice_softmax=softmax, init_scale=1.0)
  y, _, w, grads, _ = run_switch(layer, x, pad, train=True, grads=True)
  r = np.random.RandomState(1).randn(*y.shape)  # run_switch's fixed random r (seed + 1)

  def objective(w_r):
    ref_y, ref_loss, _ = reference.expert_choice_reference(
        x, pad, dict(w, expert_selection_gating=w_r), 4, 2, 1e-2, softmax)
    return np.sum(ref_y * r) + ref_loss

  w_r = w["expert_selection_gating"].astype(np.float64)
  numeric = np.zeros_like(w_r)
  for index in np.ndindex(*w_r.shape):
    step = np.zeros_like(w_r)
    step[index] = 1e-5
    numeric[index] = (objective(w_r + step) - objective(w_r - step)) / 2e-5
  assert np.abs(numeric).max() > 1e-3
  np.testing.assert_allclose(grads["expert_selection_gating"], numeric, rtol=2e-3, atol=2e-4)


def test_expert_choice_balance_loss_is_one_when_routing_is_uniform(rng):
  """A zero router (every p_e(s) = 1/S'): L_B = 1, as MoE1D's comment says; z-loss off."""
  x, pad = _inputs(rng)
  layer = _layer(init_scale=1e-30, loss_coef=1.0)
  _, loss, _ = run_switch(layer, x, pad, train=True)
  assert loss == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("dispatch", ["gather", "ragged"])
@pytest.mark.parametrize("train", [True, False])
def test_expert_choice_dispatches_equal_einsum_with_gradients(rng, train, dispatch):
  x, pad = _inputs(rng)
  got = run_switch(_layer(dispatch=dispatch), x, pad, train=train, grads=True)
  want = run_switch(_layer(dispatch="einsum"), x, pad, train=train, grads=True)
  _assert_same(got, want)
  assert np.abs(got[3]["expert_selection_gating"]).max() > 0  # router trained through gates


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_expert_choice_in_bfloat16_routes_as_float32(rng, dispatch):
  """Selective precision: with bfloat16 activations the router is float32, so the experts take
  the same tokens; outputs differ by bfloat16 rounding only."""
  x, pad = _inputs(rng)
  y32, _, _ = run_switch(_layer(dispatch=dispatch), x, pad, train=True)
  y16, loss16, _ = run_switch(_layer(dispatch=dispatch), x, pad, train=True,
                              dtype=tf.bfloat16)
  np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.02 * np.abs(y32).max())
  assert np.array_equal(np.abs(y16).sum(-1) == 0, np.abs(y32).sum(-1) == 0)
  assert np.isfinite(loss16)


def test_expert_choice_gather_has_no_one_hot_einsum():
  graph = layer_graph(_layer(dispatch="gather", group_size=64), 4, 64)
  for op in graph.operations:
    names = {n for t in op.inputs + op.outputs for n in t.shape.dimension_names}
    assert not {"group", "expert_unsplit", "expert_capacity"} <= names or not isinstance(
        op, (mtf.ops.EinsumOperation, mtf.ops.OneHotOperation)), op.name


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_expert_choice_layout_equals_single_device(rng, name, dispatch):
  shape, mesh_shape, layout, devices, experts, _ = LAYOUTS[name]
  x = rng.randn(*shape).astype(np.float32)
  pad = np.ones(shape[:-1], np.float32)
  pad[..., -3:] = 0.0
  layer = _layer(num_experts=experts, group_size=16, dispatch=dispatch)
  single = run_switch(layer, x, pad, train=True, grads=True)
  multi = run_switch(layer, x, pad, train=True, mesh_shape=mesh_shape, layout=layout,
                     num_devices=devices, grads=True)
  _assert_same(single, multi)


@pytest.mark.parametrize("dispatch", ["einsum", "gather", "ragged"])
@pytest.mark.parametrize("train", [True, False])
def test_switch_max_is_top1_with_batch_prioritized_routing(rng, train, dispatch):
  x, pad = _inputs(rng)
  y, loss, w = run_switch(_layer("switch_max", dispatch=dispatch, dropless_predict=False), x,
                          pad, train=train)
  assert set(w) == {"switch_max_gating", "wi_0", "wi_1", "wo"}
  capacity = 2 if train else 4
  ref_y, ref_loss, _ = reference.switch_reference(x, pad, w, 4, capacity, 1e-2, bpr=True)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  if train:  # not the same as routing in token order
    in_order, _, _ = reference.switch_reference(x, pad, w, 4, capacity, 1e-2)
    assert np.abs(in_order - ref_y).max() > 1e-3


def _context(autoregressive):
  model = types.SimpleNamespace(ensemble_dim=None, autoregressive=autoregressive)
  return types.SimpleNamespace(model=model)


@pytest.mark.parametrize("router", ["expert_choice", "switch_max"])
def test_routers_that_see_the_group_refuse_a_decoder(router):
  with pytest.raises(ValueError, match=r"SwitchFFN.router='%s' is for encoders only.*"
                     r"encoder/SwitchFFN.router = '%s'" % (router, router)):
    _layer(router).call(_context(True), None)


def test_bad_router_arguments():
  with pytest.raises(ValueError, match="Unknown SwitchFFN.router 'experts_choose'"):
    _layer("experts_choose")
  with pytest.raises(ValueError, match="Unknown SwitchFFN.expert_choice_softmax 'group'"):
    _layer(expert_choice_softmax="group")
  with pytest.raises(ValueError, match="switch_max' is top-1.*num_selected_experts=2"):
    _layer("switch_max", num_selected_experts=2)
  for mode in ("train", "eval"):
    with pytest.raises(ValueError, match="expert_choice' drops no token.*dropless_train"):
      _layer(**{"dropless_" + mode: True})


def test_expert_choice_capacity_that_rounds_to_zero_is_an_error(rng):
  x, pad = _inputs(rng)
  with pytest.raises(ValueError, match="Expert capacity rounds to 0 tokens.*capacity_factor"):
    run_switch(_layer(capacity_factor_train=0.1, min_capacity=0), x, pad, train=True)


def test_expert_choice_capacity_is_at_most_the_group():
  """min_capacity above S: an expert takes the whole group (MoE1D's top_k would fail)."""
  x = np.random.RandomState(1).randn(2, S, 12).astype(np.float32)
  y, _, w = run_switch(_layer(min_capacity=16), x)
  ref_y, _, reached = reference.expert_choice_reference(x, None, w, 2, S, 1e-2)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  assert np.all(reached == E)


def test_inference_routes_expert_choice_with_capacity_whatever_dropless_predict(rng):
  """dropless_predict (on by default) does not apply: inference is capacity_factor_eval's."""
  x, pad = _inputs(rng)
  with tf.Graph().as_default():
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    dims = [mtf.Dimension("batch", 4), mtf.Dimension("length", S)]
    model_dim = mtf.Dimension("d_model", 12)
    mx = mtf.import_tf_tensor(mesh, tf.constant(x), mtf.Shape(dims + [model_dim]))
    _layer().apply(mx, model_dim, train=False, variable_dtype=mtf.VariableDType(),
                   predict=True)
    (settings,) = [json.loads(s) for s in tf.get_collection(layers.LAYERS)]
  assert settings["dropless"] is False and settings["expert_capacity"] == 4
  assert settings["router"] == "expert_choice" and settings["experts_per_token"] == 2.0


def test_counter_counts_the_experts_a_token_reaches_on_average():
  """Expert choice at cf 1.0 costs what top-1 costs (E C / S = 1 expert per token); at cf 2.0
  the encoder's experts cost twice as much; parameters are the same."""
  gin_model = "gin/models/expert_choice_tiny.gin"
  top1 = count.count(["gin/models/switch_tiny.gin"], ["SwitchFFN.capacity_factor_eval = 1.0"])
  same = count.count([gin_model], ["SwitchFFN.capacity_factor_eval = 1.0"])
  double = count.count([gin_model], ["SwitchFFN.capacity_factor_eval = 2.0"])
  assert same["params"] == top1["params"] == double["params"]
  assert same["flops_per_sequence"] == top1["flops_per_sequence"]
  # encoder expert flops: 2 |W| T per expert-weight matmul, per Switch layer
  top2 = count.count(["gin/models/switch_tiny.gin"], ["encoder/SwitchFFN.num_selected_experts=2",
                                                      "SwitchFFN.capacity_factor_eval = 2.0"])
  assert double["flops_per_sequence"] == top2["flops_per_sequence"]
  assert double["flops_per_sequence"] > same["flops_per_sequence"]


# MoE1D expert_selection or switch_max in the encoder, switch in the decoder, through the stock
# binary: the MoE1D twin of switch_tiny with its encoder's gating changed, against
# expert_choice_tiny and switch_tiny with encoder switch_max. Inference with capacity on both
# sides (SwitchFFN's token-choice layers are dropless there by default, MoE1D is not).
MOE1D_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin",
                         "switch_tiny_moe1d.gin")
# (switch_max, top-1 with batch-prioritized routing, interchanges at layer level both ways, bit
# for bit: tests/test_moe1d_compat.py)
def test_moe1d_checkpoint_scores_identically_under_switch_ffn(tmp_path, binary_env):
  from test_end_to_end import score  # pylint: disable=g-import-not-at-top
  env, gating = binary_env, "expert_selection"
  model_dir = tmp_path / "moe1d"
  moe1d_params = binary.SMALL + ("encoder/MoE1D.moe_gating='%s'" % gating,)
  binary.train(env, model_dir, MOE1D_GIN, 6, *moe1d_params)
  names = [n for n, _ in tf.train.list_variables(str(model_dir))]
  assert "encoder/block_000/layer_003/MoE1D/%s_gating/kernel" % gating in names
  by_moe1d = score(env, model_dir, MOE1D_GIN, tmp_path, *moe1d_params)
  by_switch = score(env, model_dir, "gin/models/expert_choice_tiny.gin", tmp_path,
                    *binary.SMALL, "SwitchFFN.dropless_predict=False")
  print("%s scores: MoE1D %s, SwitchFFN %s" % (gating, by_moe1d, by_switch))
  assert by_moe1d.shape == (3,) and np.all(by_moe1d < 0)
  np.testing.assert_allclose(by_switch, by_moe1d, rtol=1e-5)


def test_expert_choice_tiny_trains_through_the_binary(tmp_path, binary_env):
  """Expert choice trained through the binary, routing summaries included: the loss is finite
  and falls. (SwitchFFN -> MoE1D checkpoints: bit for bit at layer level, test_moe1d_compat.)"""
  from test_end_to_end import losses  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / "expert_choice"
  final = binary.train(binary_env, model_dir, "gin/models/expert_choice_tiny.gin", 10,
                       *binary.SMALL)
  assert np.isfinite(final) and final < losses(model_dir)[0]
  summaries = report.read_summaries(str(model_dir))
  for layer, values in summaries.items():
    multi = values["multi_expert_fraction"][1]
    if layer.startswith("encoder"):  # expert choice: some tokens get several, some none
      assert np.all(multi > 0) and np.all(values["unrouted_fraction"][1] > 0), layer
      assert np.all(values["dropped_fraction"][1] == 0), layer
    else:
      assert np.all(multi == 0), layer


def test_switch_attention_projections_keep_top_k_under_a_router_binding():
  """SwitchSelfAttention passes every SwitchFFN argument, so SwitchFFN.router does not reach
  its projections (which route every position, decoders included)."""
  from mtf_switch import attention  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    gin.bind_parameter("SwitchFFN.router", "expert_choice")
  assert layers.SwitchFFN().router == "expert_choice"  # the binding applies to SwitchFFN
  assert attention.SwitchSelfAttention(num_experts=2).projection.router == "top_k"

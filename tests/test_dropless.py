"""Dropless routing (SwitchFFN.dropless_train / dropless_eval): no token is dropped, for every
dispatch, with top-1, top-2, batch-prioritized routing and no-token-left-behind. Checked against
the numpy reference without capacity (outputs, aux loss, and gradients by finite differences),
against a run whose capacity factor (cf = E, so C = S) is large enough to drop nothing, and by
the routing summaries; plus the error for a dropless einsum dispatch too large for a device."""
import functools

import mesh_tensorflow as mtf
import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorflow.python.tpu import tpu_function  # pylint: disable=g-direct-tensorflow-import

from mtf_switch import dispatch as dispatch_lib
from mtf_switch import layers

from conftest import run_switch
from reference import switch_reference

# No jitter; cf 1.0 gives C = int(8 * 1.0 / 4) = 2 of the 8 tokens of a group: drops.
E = 4
BASE = dict(num_experts=E, hidden_size=16, group_size=8, min_capacity=1, init_scale=1.0,
            router_policy="argmax", capacity_factor_train=1.0, capacity_factor_eval=1.0,
            loss_coef=1e-2, router_z_loss_coef=1e-3)
CAPACITY = 2
VARIANTS = {
    "top1": dict(),
    "top2": dict(num_selected_experts=2, second_policy_train="all", second_policy_eval="all"),
    "bpr_top2": dict(num_selected_experts=2, second_policy_train="all",
                     second_policy_eval="all", batch_prioritized_routing=True),
    "ntlb": dict(no_token_left_behind=3),
}
SETTINGS = {
    "dropless": dict(dropless_train=True),
    "cf_E": dict(capacity_factor_train=float(E)),  # C = S * E / E = S: nothing can drop
    "capped": dict(),
}
DISPATCHES = ["einsum", "gather", "ragged"]


def _data():
  rng = np.random.RandomState(0)
  x = rng.randn(4, 8, 12).astype(np.float32)
  pad = (rng.rand(4, 8) > 0.2).astype(np.float32)
  return x, pad


def _reference_args(variant):
  kw = VARIANTS[variant]
  return dict(k=kw.get("num_selected_experts", 1), bpr=kw.get("batch_prioritized_routing", False),
              ntlb=kw.get("no_token_left_behind", 0), z_coef=BASE["router_z_loss_coef"])


@functools.lru_cache(maxsize=None)
def _run(variant, dispatch, setting):
  """(y, aux loss, weights, gradients, all-to-alls, summaries) of a training step on _data()."""
  x, pad = _data()
  layer = layers.SwitchFFN(dispatch=dispatch, **dict(BASE, **VARIANTS[variant],
                                                     **SETTINGS[setting]))
  return run_switch(layer, x, pad, train=True, grads=True, summaries=True)


def _summary(summaries, metric):
  (value,) = [v for k, v in summaries.items() if k.endswith("/" + metric)]
  return float(value)


def _reference_objective(variant, weights, x, pad, capacity):
  """The numpy objective run_switch differentiates: sum(y * r) + aux loss."""
  y, loss, _ = switch_reference(x, pad, weights, num_groups=4, capacity=capacity,
                                loss_coef=BASE["loss_coef"], **_reference_args(variant))
  r = np.random.RandomState(1).randn(*x.shape).astype(np.float32)  # run_switch's r (seed 0)
  return np.sum(y * r) + loss


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dropless_matches_reference_without_capacity(variant, dispatch):
  x, pad = _data()
  y, loss, w, grads, _, _ = _run(variant, dispatch, "dropless")
  ref_y, ref_loss, dropped = switch_reference(
      x, pad, w, num_groups=4, capacity=None, loss_coef=BASE["loss_coef"],
      **_reference_args(variant))
  assert dropped == 0
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-7, rtol=1e-5)
  # Gradients: directional derivatives of the reference objective (central differences, float64)
  rng = np.random.RandomState(2)
  weights = {k: v.astype(np.float64) for k, v in w.items()}
  for name in sorted(grads):
    value = x.astype(np.float64) if name == "x" else weights[name]
    direction = rng.randn(*value.shape)
    eps = 1e-4
    objective = []
    for sign in (1, -1):
      moved = value + sign * eps * direction
      if name == "x":
        objective.append(_reference_objective(variant, weights, moved, pad, None))
      else:
        objective.append(_reference_objective(variant, dict(weights, **{name: moved}), x, pad,
                                              None))
    numeric = (objective[0] - objective[1]) / (2 * eps)
    np.testing.assert_allclose(np.sum(grads[name] * direction), numeric, rtol=2e-4, atol=1e-4,
                               err_msg=name)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("variant", ["top1", "top2"])
def test_dropless_equals_a_capacity_that_drops_nothing(variant, dispatch):
  dropless = _run(variant, dispatch, "dropless")
  big = _run(variant, dispatch, "cf_E")
  np.testing.assert_allclose(dropless[0], big[0], atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(dropless[1], big[1], rtol=1e-6)
  assert set(dropless[3]) == set(big[3])
  for name in big[3]:
    np.testing.assert_allclose(dropless[3][name], big[3][name], atol=1e-6, rtol=1e-5,
                               err_msg=name)
  assert _summary(big[5], "dropped_fraction") == 0.0


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_summaries_report_nothing_dropped(variant, dispatch):
  dropless, capped = _run(variant, dispatch, "dropless"), _run(variant, dispatch, "capped")
  assert _summary(dropless[5], "dropped_fraction") == 0.0
  assert _summary(dropless[5], "unrouted_fraction") == 0.0
  assert _summary(capped[5], "dropped_fraction") > 0.0
  # Outputs differ where the capped run dropped; the balance loss (first choices before
  # capacity) and the z-loss do not depend on the capacity.
  assert np.abs(dropless[0] - capped[0]).max() > 1e-3
  np.testing.assert_allclose(dropless[1], capped[1], rtol=1e-6)
  for metric in ("balance_loss", "z_loss", "router_entropy", "top1_gate"):
    np.testing.assert_allclose(_summary(dropless[5], metric), _summary(capped[5], metric),
                               rtol=1e-6, err_msg=metric)


def test_dropless_fractions_are_exactly_zero_at_a_realistic_size():
  """1024 tokens over 8 experts: the fractions are computed from counts, so they are exactly 0
  (here 1 - the routed tokens' float32 mean was 6e-8)."""
  rng = np.random.RandomState(10)
  x = rng.randn(8, 128, 16).astype(np.float32)
  pad = (rng.rand(8, 128) > 0.1).astype(np.float32)
  layer = layers.SwitchFFN(**dict(BASE, num_experts=8, group_size=1024, dropless_train=True,
                                  dispatch="ragged"))
  summaries = run_switch(layer, x, pad, train=True, summaries=True)[3]
  assert _summary(summaries, "dropped_fraction") == 0.0
  assert _summary(summaries, "unrouted_fraction") == 0.0


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_dropless_eval_and_train_are_separate_settings(dispatch):
  x, pad = _data()
  kw = dict(BASE, dispatch=dispatch, num_selected_experts=2, second_policy_eval="all")
  evaluated = {}
  for name, setting in [("eval", dict(dropless_eval=True)), ("train", dict(dropless_train=True))]:
    y, _, w = run_switch(layers.SwitchFFN(**kw, **setting), x, pad, train=False)
    evaluated[name] = (y, w)
  args = dict(num_groups=4, loss_coef=1e-2, k=2, z_coef=1e-3)
  y, w = evaluated["eval"]
  np.testing.assert_allclose(y, switch_reference(x, pad, w, capacity=None, **args)[0],
                             atol=1e-5, rtol=1e-5)
  y, w = evaluated["train"]  # dropless_train does not apply in evaluation: C = 2
  ref_y, _, dropped = switch_reference(x, pad, w, capacity=CAPACITY, **args)
  assert dropped > 0
  np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)


def _build(layer, shape, train=True):
  """Builds (does not run) the layer on zeros of `shape` [batch, length, d_model]."""
  with tf.Graph().as_default():
    mesh = mtf.Mesh(mtf.Graph(), "mesh")
    dims = [mtf.Dimension(n, s) for n, s in zip(("batch", "length", "d_model"), shape)]
    x = mtf.zeros(mesh, mtf.Shape(dims))
    layer.apply(x, dims[-1], train=train,
                variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.float32))


# 2 x 4096 tokens in 2 groups of S = 4096, E = 32: [2, 4096, 32, 4096] float32 = 4 GiB.
LARGE = dict(num_experts=32, hidden_size=4, group_size=4096)


def test_dropless_einsum_too_large_for_a_device_is_an_error():
  with pytest.raises(ValueError, match=r"SwitchFFN\.dropless_train = True.*C = S = 4096.*"
                     r"4\.00 GiB.*SwitchFFN\.group_size to at most 1024.*dispatch='gather'"):
    _build(layers.SwitchFFN(dispatch="einsum", dropless_train=True, **LARGE), (2, 4096, 8))
  with pytest.raises(ValueError, match=r"SwitchFFN\.dropless_eval = True"):
    _build(layers.SwitchFFN(dispatch="einsum", dropless_eval=True, **LARGE), (2, 4096, 8),
           train=False)
  # On a TPU, "auto" picks the einsum dispatch.
  with tpu_function.tpu_shard_context(8):
    with pytest.raises(ValueError, match=r"SwitchFFN\.dropless_train = True"):
      _build(layers.SwitchFFN(dropless_train=True, **LARGE), (2, 4096, 8))
  # The suggested group size fits; gather, ragged and capacity-limited routing build.
  _build(layers.SwitchFFN(dispatch="einsum", dropless_train=True,
                          **dict(LARGE, group_size=1024)), (2, 4096, 8))
  for kw in [dict(dispatch="gather", dropless_train=True),
             dict(dispatch="ragged", dropless_train=True), dict(dispatch="einsum")]:
    _build(layers.SwitchFFN(**dict(LARGE, **kw)), (2, 4096, 8))


def test_dropless_einsum_limit_counts_bytes_per_device():
  def shape(groups, s, e):
    return mtf.Shape([mtf.Dimension("outer_batch", 1), mtf.Dimension("batch", groups),
                      mtf.Dimension("group", s), mtf.Dimension("expert_unsplit", e),
                      mtf.Dimension("expert_capacity", s)])
  limit = dispatch_lib.DROPLESS_EINSUM_MAX_BYTES
  assert limit == 2 ** 30
  # Switch-Base on a v3-32: 32 groups per core of S = 64, E = 128 is exactly 1 GiB.
  dispatch_lib.check_dropless_einsum(shape(32 * 16, 64, 128), "", "", "SwitchFFN.dropless_train")
  with pytest.raises(ValueError, match="at most 64"):
    dispatch_lib.check_dropless_einsum(shape(32 * 8, 128, 128), "", "", "x")
  # Split 32 ways over the batch mesh axis, the global tensor is 32 times that.
  dispatch_lib.check_dropless_einsum(shape(32 * 32 * 16, 64, 128), "batch:b", "b:32", "x")
  with pytest.raises(ValueError):
    dispatch_lib.check_dropless_einsum(shape(32 * 32 * 16, 64, 128), "batch:b", "b:16", "x")

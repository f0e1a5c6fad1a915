"""Top-1 ("Switch") routing: router logits -> expert choice and gate per token.

A router knows nothing about capacity; `dispatch.py` turns its result into dispatch/combine
tensors. Symbols follow the Switch paper (Fedus et al. 2021): p_i(x) router probabilities,
W_r router weights, E experts.
"""
import collections

import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf

# Router exploration policies (paper Table 11). All route to the top-1 expert; they differ in
# how router inputs are perturbed during training. Evaluation never perturbs.
POLICIES = ("argmax", "input_jitter", "input_dropout")
# Scope of the router's kernel (mesh-tensorflow MoE1D's name, for checkpoint compatibility).
ROUTER_SCOPE = "switch_gating"

RouterOutput = collections.namedtuple(
    "RouterOutput", ["expert_index", "expert_gate", "router_probs", "router_logits"])
RouterOutput.__doc__ = """What a router returns (all float32, shapes [..., group]/[..., group, experts]).

expert_index: int32 [outer_batch, groups, group] chosen expert per token.
expert_gate: [outer_batch, groups, group] p_i(x) of the chosen expert (paper Eq. 2 gate).
router_probs: [outer_batch, groups, group, experts] softmax of the logits, p_i(x) (Eq. 1).
router_logits: [outer_batch, groups, group, experts] h(x) = W_r . x.
"""


def check_policy(policy):
  if policy not in POLICIES:
    raise ValueError("Unknown router policy %r (gin: SwitchFFN.router_policy); choose one "
                     "of %s (Switch paper Table 11)." % (policy, ", ".join(POLICIES)))


def top1_router(inputs, experts_dim, policy, jitter_eps, dropout_rate, train, variable_dtype,
                kernel_initializer, name=ROUTER_SCOPE):
  """Routes each token of `inputs` [..., d_model] to one expert.

  Selective precision (paper Sec. 2.4): the router runs in float32 whatever the activation dtype;
  its kernel keeps the model's master/slice dtypes.
  """
  check_policy(policy)
  x = mtf.to_float(inputs)
  if train and policy == "input_jitter":
    # x <- x * U[1 - eps, 1 + eps]  (multiplicative input jitter, Table 11)
    x = mtf.layers.multiplicative_jitter(x, jitter_eps)
  elif train and policy == "input_dropout":
    x = mtf.dropout(x, is_training=True, keep_prob=1.0 - dropout_rate)
  router_dtype = mtf.VariableDType(variable_dtype.master_dtype, variable_dtype.slice_dtype,
                                   tf.float32)
  # h(x) = W_r . x  (no bias)
  logits = mtf.layers.dense(x, experts_dim, reduced_dims=x.shape.dims[-1:], use_bias=False,
                            variable_dtype=router_dtype, kernel_initializer=kernel_initializer,
                            name=name)
  # p_i(x) = exp(h_i(x)) / sum_j exp(h_j(x))   (Eq. 1)
  probs = mtf.softmax(logits, reduced_dim=experts_dim)
  gate, index = mtf.top_1(probs, reduced_dim=experts_dim)
  return RouterOutput(index, gate, probs, logits)

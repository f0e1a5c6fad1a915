"""Routers: router logits -> each token's ranked expert choices and their gates.

A router knows nothing about capacity; `dispatch.py` turns its choices into capacity slots.
Symbols follow the Switch paper (Fedus et al. 2021) and ST-MoE (Zoph et al. 2022): h(x) router
logits, p_i(x) router probabilities, W_r router weights, E experts, k experts per token.
"""
import collections

import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf

# Router exploration policies (Switch paper Table 11): how router inputs are perturbed during
# training. Evaluation never perturbs.
POLICIES = ("argmax", "input_jitter", "input_dropout")
# Which of the 2nd..k-th choices are used (GShard / mesh-tensorflow's moe_second_policy).
SECOND_POLICIES = ("all", "none", "threshold", "random")
# Scope of the router's kernel: mesh-tensorflow MoE1D's names, for checkpoint compatibility.
ROUTER_SCOPES = {1: "switch_gating", 2: "top_2_gating"}
TOP_N_SCOPE = "top_n_gating"
NTLB_SCOPE = "ntlb_gating"

Choice = collections.namedtuple("Choice", ["expert_index", "gate", "candidate"])
Choice.__doc__ = """One of a token's ranked expert choices ([O, G, S] each).

expert_index: int32 the expert.
gate: its weight in the combined output: p_i(x), renormalised over the k choices when k > 1.
candidate: {0,1} float whether the choice is used (second-expert policy), or None for all.
"""

RouterOutput = collections.namedtuple("RouterOutput", ["choices", "router_probs",
                                                       "router_logits"])
RouterOutput.__doc__ = """What a router returns (float32).

choices: list of Choice, best first; capacity is given to all first choices, then all second
  choices, and so on (dispatch.assign_slots).
router_probs: [O, G, S, E] p_i(x) = softmax(h(x))_i (Switch Eq. 1).
router_logits: [O, G, S, E] h(x) = W_r . x.
"""


def router_scope(num_selected_experts, no_token_left_behind=False):
  if no_token_left_behind:
    return NTLB_SCOPE
  return ROUTER_SCOPES.get(num_selected_experts, TOP_N_SCOPE)


def check_policy(policy):
  if policy not in POLICIES:
    raise ValueError("Unknown router policy %r (gin: SwitchFFN.router_policy); choose one "
                     "of %s (Switch paper Table 11)." % (policy, ", ".join(POLICIES)))


def check_second_policy(policy):
  if policy not in SECOND_POLICIES:
    raise ValueError("Unknown second-expert policy %r (gin: SwitchFFN.second_policy_train / "
                     "second_policy_eval); choose one of %s." % (policy,
                                                                ", ".join(SECOND_POLICIES)))


def router_logits(inputs, experts_dim, policy, jitter_eps, dropout_rate, train, variable_dtype,
                  kernel_initializer, name):
  """h(x) = W_r . x for inputs [..., d_model], in float32 whatever the activation dtype
  (selective precision, Switch paper Sec. 2.4); the kernel keeps the model's master/slice
  dtypes."""
  check_policy(policy)
  x = mtf.to_float(inputs)
  if train and policy == "input_jitter":
    # x <- x * U[1 - eps, 1 + eps]  (multiplicative input jitter, Table 11)
    x = mtf.layers.multiplicative_jitter(x, jitter_eps)
  elif train and policy == "input_dropout":
    x = mtf.dropout(x, is_training=True, keep_prob=1.0 - dropout_rate)
  router_dtype = mtf.VariableDType(variable_dtype.master_dtype, variable_dtype.slice_dtype,
                                   tf.float32)
  return mtf.layers.dense(x, experts_dim, reduced_dims=x.shape.dims[-1:], use_bias=False,
                          variable_dtype=router_dtype, kernel_initializer=kernel_initializer,
                          name=name)


def top_k_router(logits, experts_dim, k, second_policy="all", second_threshold=0.2,
                 renormalize=True):
  """Each token's k best experts (k = 1: Switch; k = 2: MoE-Base of Switch Table 1 / GShard;
  k = n: ST-MoE top-n), as mesh-tensorflow's _top_2_gating / _top_n_gating compute them.

  With k > 1 and renormalize, gates are g_j / sum_{j'<=k} g_j'. second_policy decides which of
  the 2nd..k-th choices are used: "all"; "none"; "threshold" (if the renormalised gate >
  second_threshold); "random" (with probability min(1, gate / second_threshold), GShard).
  renormalize=False (no-token-left-behind) keeps the raw p_i(x) as gates.
  """
  check_second_policy(second_policy)
  # p_i(x) = exp(h_i(x)) / sum_j exp(h_j(x))   (Switch Eq. 1)
  probs = mtf.softmax(logits, reduced_dim=experts_dim)
  remaining = probs
  ranked = []
  for _ in range(k):
    gate, index = mtf.top_1(remaining, reduced_dim=experts_dim)
    remaining *= 1.0 - mtf.one_hot(index, experts_dim, dtype=probs.dtype)
    ranked.append((index, gate))
  if k > 1 and renormalize:
    total = mtf.add_n([g for _, g in ranked]) + 1e-9
    ranked = [(i, g / total) for i, g in ranked]
  choices = [Choice(ranked[0][0], ranked[0][1], None)]
  for index, gate in ranked[1:]:
    choices.append(Choice(index, gate, _second_candidate(gate, second_policy,
                                                         second_threshold)))
  return RouterOutput(choices, probs, logits)


def _second_candidate(gate, policy, threshold):
  if policy == "all":
    return None
  if policy == "none":
    return mtf.zeros_like(gate)
  if policy == "threshold":
    return mtf.to_float(mtf.greater(gate, threshold))
  # "random": P(use) = min(1, gate / threshold)
  return mtf.to_float(mtf.less(mtf.random_uniform(gate.mesh, gate.shape),
                               gate / max(threshold, 1e-9)))

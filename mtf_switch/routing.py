"""Routers: router logits -> who is routed where, with which gates.

Two families (SwitchFFN.router): token choice ("top_k", "switch_max": each token ranks the
experts; the router knows nothing about capacity, `dispatch.assign_slots` turns its choices into
capacity slots) and expert choice ("expert_choice": each expert takes the C best tokens of its
group, so the capacity is the routing; `expert_choice_router` returns the slots themselves).
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
SWITCH_MAX_SCOPE = "switch_max_gating"
EXPERT_CHOICE_SCOPE = "expert_selection_gating"
ALL_SCOPES = tuple(ROUTER_SCOPES.values()) + (TOP_N_SCOPE, NTLB_SCOPE, SWITCH_MAX_SCOPE,
                                              EXPERT_CHOICE_SCOPE)
# SwitchFFN.router: "top_k" (tokens choose k experts), "switch_max" (MoE1D's switch_max: top-1
# with batch-prioritized routing), "expert_choice" (Zhou et al. 2022; MoE1D's expert_selection).
ROUTERS = ("top_k", "switch_max", "expert_choice")
# SwitchFFN.expert_choice_softmax: the axis of p in expert choice. "tokens": MoE1D's
# expert_selection (softmax over the group's tokens, gates / number of experts a token reaches,
# MoE1D's balance loss); "experts": Zhou et al. 2022 and flaxformer's ExpertsChooseMaskedRouter
# (softmax over experts, gates p_e(x) as they are, no balance loss).
EXPERT_CHOICE_SOFTMAX = ("tokens", "experts")

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


ExpertChoice = collections.namedtuple("ExpertChoice", ["token", "slot_gate", "chosen",
                                                       "gate", "router_probs"])
ExpertChoice.__doc__ = """What the expert-choice router returns (float32 unless said).

token: int32 [O, G, E, C] the token of the group in each expert's capacity slot (best first).
slot_gate: [O, G, E, C] its gate, 0 where the slot holds padding (the group has fewer than C
  real tokens).
chosen: [O, G, S, E] {0,1} whether expert e took real token s (no gradient).
gate: [O, G, S, E] the same gates token by token, 0 where not chosen.
router_probs: [O, G, S, E] p, softmax of h(x) over the tokens or the experts
  (expert_choice_softmax).
"""


def router_scope(num_selected_experts, no_token_left_behind=False, router="top_k"):
  if router == "expert_choice":
    return EXPERT_CHOICE_SCOPE
  if router == "switch_max":
    return SWITCH_MAX_SCOPE
  if no_token_left_behind:
    return NTLB_SCOPE
  return ROUTER_SCOPES.get(num_selected_experts, TOP_N_SCOPE)


def check_choice(value, choices, name):
  if value not in choices:
    raise ValueError("Unknown SwitchFFN.%s %r; choose one of %s." % (name, value,
                                                                    ", ".join(choices)))


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


def expert_choice_router(logits, nonpadding, experts_dim, group_dim, capacity_dim,
                         softmax="tokens"):
  """Each expert takes the C = capacity_dim.size real tokens of its group with the highest p
  (Zhou et al. 2022), as mesh-tensorflow's _expert_selection_gating computes them: a token may
  reach several experts or none; padding is never chosen. C must be <= S.

  softmax "tokens" (MoE1D): p_e(s) = softmax over the group's real tokens s of h_e(s), gate
  g_e(s) = p_e(s) / (number of experts that took s). "experts" (Zhou et al., flaxformer):
  p_e(s) = softmax over experts of h(s) (Switch Eq. 1), g_e(s) = p_e(s).
  """
  check_choice(softmax, EXPERT_CHOICE_SOFTMAX, "expert_choice_softmax")
  if softmax == "tokens":
    # Padding gets h = -1e9 so that it takes no probability (MoE1D's expression).
    masked = logits + mtf.cast(mtf.equal(nonpadding, 0.0), logits.dtype) * -1e9
    # p_e(s) = exp(h_e(s)) / sum_{s' in group} exp(h_e(s'))
    probs = mtf.softmax(masked, reduced_dim=group_dim)
  else:
    probs = mtf.softmax(logits, reduced_dim=experts_dim) * nonpadding
  # (p_e(s_1), s_1), ..., (p_e(s_C), s_C): each expert's C best tokens (ties: lower s first)
  top_p, token = mtf.top_k(probs, reduced_dim=group_dim, k_dim=capacity_dim)
  real = _at_token(nonpadding, token, "expert_choice_real")  # [O, G, E, C]
  chosen = mtf.slicewise(
      lambda t, r: _chosen(t, r, group_dim.size), [token, mtf.stop_gradient(real)],
      probs.shape, tf.float32, splittable_dims=probs.shape.dims[:2],
      name="expert_choice_chosen")
  if softmax == "tokens":
    reached = mtf.maximum(mtf.reduce_sum(chosen, reduced_dim=experts_dim), 1.0)  # [O, G, S]
    # g_e(s) = p_e(s) / |{e': e' took s}|  (MoE1D's normalize_by_num_experts_routed)
    slot_gate = top_p * real / _at_token(reached, token, "expert_choice_reached")
    gate = probs * chosen / reached
  else:
    slot_gate = top_p * real
    gate = probs * chosen
  return ExpertChoice(token, slot_gate, chosen, gate, probs)


def _at_token(values, token, name):
  """values [O, G, S] at each slot's token [O, G, E, C] (no gradient)."""
  return mtf.slicewise(
      lambda v, t: tf.gather(v, t, axis=2, batch_dims=2), [mtf.stop_gradient(values), token],
      token.shape, values.dtype, splittable_dims=token.shape.dims[:2], name=name)


def _chosen(token, real, group_size):
  """Slot tokens [o, g, E, C] and whether each is real -> [o, g, S, E] {0,1}: expert e took
  real token s (a scatter of the E * C slots, not an [S, E, C] one-hot)."""
  o, g, e = (tf.shape(token)[i] for i in range(3))
  expert = tf.reshape(tf.range(e), [1, 1, e, 1])
  group = tf.reshape(tf.range(o * g), [o, g, 1, 1])
  ids = (group * group_size + token) * e + expert  # flat index of [o * g, S, E]
  out = tf.math.unsorted_segment_sum(tf.reshape(real, [-1]), tf.reshape(ids, [-1]),
                                     o * g * group_size * e)
  return tf.reshape(out, [o, g, group_size, e])

"""Auxiliary router losses, computed in float32. The layer adds c_B L_B + c_z L_z to the model's
cross-entropy (ST-MoE Eq. 6); c_B = SwitchFFN.loss_coef, c_z = SwitchFFN.router_z_loss_coef."""
import mesh_tensorflow as mtf


def load_balancing_loss(router_probs, expert_mask, nonpadding, experts_dim, group_dim):
  """N * sum_i f_i * P_i per group (Switch paper Eq. 4-6), averaged over non-empty groups.

  f_i: fraction of real tokens whose top-1 choice is expert i (before capacity);
  P_i: mean router probability for expert i over real tokens. Padding is excluded from both
  (mesh-tensorflow's MoE1D counts padding in f_i). Equals 1 when routing is uniform.
  """
  tokens = mtf.reduce_sum(nonpadding, reduced_dim=group_dim)  # [O, G]
  denom = mtf.maximum(tokens, 1.0)
  f = mtf.reduce_sum(expert_mask, reduced_dim=group_dim) / denom
  p = mtf.reduce_sum(router_probs * nonpadding, reduced_dim=group_dim) / denom
  per_group = float(experts_dim.size) * mtf.reduce_sum(f * p, reduced_dim=experts_dim)
  nonempty = mtf.to_float(mtf.greater(tokens, 0.0))
  return mtf.reduce_sum(per_group * nonempty) / mtf.maximum(mtf.reduce_sum(nonempty), 1.0)


def router_z_loss(router_logits, nonpadding, experts_dim):
  """L_z = (1/B) sum_tokens (log sum_j exp(h_j(x)))^2 over the B real tokens (ST-MoE Eq. 5);
  padding is excluded."""
  log_z = mtf.reduce_logsumexp(router_logits, reduced_dim=experts_dim)
  return (mtf.reduce_sum(mtf.square(log_z) * nonpadding) /
          mtf.maximum(mtf.reduce_sum(nonpadding), 1.0))


def expert_choice_balance_loss(router_probs, nonpadding, experts_dim, group_dim):
  """MoE1D's expert_selection loss: mean over groups of S' sum_s (1/E sum_e p_e(s))^2, S' the
  group's real tokens and p softmax over its tokens (routing.expert_choice_router); it pushes
  each token's mean probability to 1/S' and equals 1 when routing is uniform. Padding is
  excluded; empty groups count 0, as in MoE1D."""
  mean_p = mtf.reduce_mean(router_probs, reduced_dim=experts_dim) * nonpadding  # [O, G, S]
  real = mtf.reduce_sum(nonpadding, reduced_dim=group_dim)  # S' [O, G]
  # L_B = mean_groups S' sum_s (1/E sum_e p_e(s))^2
  return mtf.reduce_mean(mtf.reduce_sum(mtf.square(mean_p), reduced_dim=group_dim) * real)

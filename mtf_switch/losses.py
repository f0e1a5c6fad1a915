"""Auxiliary router losses."""
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

"""Groups, expert capacity and the dispatch/combine tensors shared by every router.

Symbols: G groups, S group size (tokens per group), E experts, C expert capacity per group.
"""
import mesh_tensorflow as mtf


def split_into_groups(num_tokens, max_group_size, mesh_dim_size):
  """Returns (G, S) with G * S == num_tokens, S <= max_group_size as large as possible and G a
  multiple of mesh_dim_size (the mesh axis the batch is split over), as mesh-tensorflow's MoE1D.
  """
  if max_group_size < 1:
    raise ValueError("SwitchFFN.group_size must be >= 1, got %d." % max_group_size)
  if num_tokens % mesh_dim_size:
    raise ValueError(
        "The %d tokens per batch (batch x length) cannot be split into groups over the %d-way "
        "mesh axis the batch is laid out on: change the batch size, the sequence length or "
        "mesh_shape so that %d divides the token count (SwitchFFN.group_size=%d)."
        % (num_tokens, mesh_dim_size, mesh_dim_size, max_group_size))
  num_groups = max(1, num_tokens // max_group_size)
  while num_groups % mesh_dim_size or num_tokens % num_groups:
    num_groups += 1
  return num_groups, num_tokens // num_groups


def expert_capacity(group_size, num_experts, capacity_factor, min_capacity):
  """C = max(min(S, int(S * cf / E)), min_capacity)  (paper Eq. 3, per group)."""
  capacity = max(min(group_size, int(group_size * capacity_factor / num_experts)), min_capacity)
  if capacity < 1:
    raise ValueError(
        "Expert capacity rounds to 0 tokens (group size %d, capacity factor %g, %d experts): "
        "raise SwitchFFN.capacity_factor_train/capacity_factor_eval, SwitchFFN.group_size or "
        "SwitchFFN.min_capacity." % (group_size, capacity_factor, num_experts))
  return capacity


def dispatch_and_combine(router, nonpadding, experts_dim, group_dim, capacity_dim):
  """Assigns tokens to capacity slots in token order within each group.

  Args:
    router: a routing.RouterOutput.
    nonpadding: float [outer_batch, groups, group], 1 for real tokens, 0 for padding
      (padding is never dispatched and takes no capacity).
    experts_dim, group_dim, capacity_dim: the E, S and C dimensions.
  Returns:
    dispatch: {0,1} [outer_batch, groups, group, experts, capacity].
    combine: dispatch * gate, same shape (overflowed tokens are all zero).
    expert_mask: {0,1} [outer_batch, groups, group, experts] top-1 choice of real tokens,
      before capacity (what the balance loss counts).
  """
  expert_mask = mtf.one_hot(router.expert_index, experts_dim, dtype=router.router_probs.dtype)
  expert_mask *= nonpadding
  # Priority is token order: position of each token in its expert's queue.
  position = mtf.cumsum(expert_mask, group_dim, exclusive=True) * expert_mask
  kept = expert_mask * mtf.to_float(mtf.less(position, float(capacity_dim.size)))
  dispatch = kept * mtf.one_hot(mtf.to_int32(position), capacity_dim, dtype=kept.dtype)
  combine = dispatch * router.expert_gate
  return dispatch, combine, expert_mask

"""Groups, expert capacity, slot assignment, and the ways of moving tokens to their experts.

Symbols: G groups, S group size (tokens per group), E experts, C expert capacity per group,
M d_model. All implementations compute the same outputs and gradients with the same variables
(SwitchFFN.dispatch chooses):
  "einsum": one-hot dispatch/combine tensors [O, G, S, E, C] and einsums to expert slots
    [O, E, G, C, M] and back (mesh-tensorflow MoE1D; dense matmuls suit TPUs). Costs ~2 E C M
    multiply-adds per token each way, and the experts compute all E * C slots.
  "gather": the same slots, filled by a scatter and read back by a gather of each token's slot
    index on each device's groups (~M per token). Experts may be split over a mesh axis (the
    slots then travel by all-to-all); they still compute all E * C slots.
  "ragged": no slots: each token is multiplied by its own expert's weights (experts.py), so only
    kept tokens are computed. Needs every expert's weights on every device (experts and
    expert_hidden not split by the layout).
  "auto": einsum when the graph is built for a TPU, else ragged where the layout allows, else
    gather.
"""
import collections

import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf
from tensorflow.python.tpu import tpu_function  # pylint: disable=g-direct-tensorflow-import

IMPLEMENTATIONS = ("auto", "einsum", "gather", "ragged")

Slots = collections.namedtuple("Slots", ["expert_mask", "kept", "position", "gate"])
Slots.__doc__ = """Where each token goes (float32, [O, G, S, E] unless noted).

expert_mask: {0,1} top-1 choice of real tokens, before capacity (what the balance loss counts).
kept: {0,1} expert_mask of the tokens that fit in their expert's capacity.
position: the token's place in its expert's queue (0-based; meaningful where expert_mask is 1).
gate: [O, G, S] p_i(x) of the chosen expert.
"""


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


def assign_slots(router, nonpadding, experts_dim, group_dim, capacity_dim):
  """Assigns tokens to capacity slots in token order within each group.

  Args:
    router: a routing.RouterOutput.
    nonpadding: float [O, G, S], 1 for real tokens, 0 for padding (padding is never dispatched
      and takes no capacity).
    experts_dim, group_dim, capacity_dim: the E, S and C dimensions.
  Returns:
    Slots.
  """
  expert_mask = mtf.one_hot(router.expert_index, experts_dim, dtype=router.router_probs.dtype)
  expert_mask *= nonpadding
  # Priority is token order: position of each token in its expert's queue.
  position = mtf.cumsum(expert_mask, group_dim, exclusive=True) * expert_mask
  kept = expert_mask * mtf.to_float(mtf.less(position, float(capacity_dim.size)))
  return Slots(expert_mask, kept, position, router.expert_gate)


def check_implementation(implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError("Unknown SwitchFFN.dispatch %r; choose one of %s." % (
        implementation, ", ".join(IMPLEMENTATIONS)))


def choose(implementation, experts_split):
  """Resolves SwitchFFN.dispatch to "einsum", "gather" or "ragged" (see the module docstring).

  experts_split: whether the layout splits the expert weights over a mesh axis."""
  check_implementation(implementation)
  if implementation == "auto":
    if tpu_function.get_tpu_context().number_of_shards is not None:
      return "einsum"
    return "gather" if experts_split else "ragged"
  if implementation == "ragged" and experts_split:
    raise ValueError(
        "SwitchFFN.dispatch='ragged' needs every expert's weights on every device, but the "
        "layout splits `experts` or `expert_hidden` over the mesh: use 'gather' or 'auto'.")
  return implementation


def kept_expert(slots, experts_dim):
  """(int32 [O, G, S] expert of each kept token, E for dropped and padding tokens;
  [O, G, S] gate, 0 for them)."""
  expert = mtf.reduce_sum(slots.kept * mtf.range(slots.kept.mesh, experts_dim, tf.float32),
                          reduced_dim=experts_dim)
  dropped = 1.0 - mtf.reduce_sum(slots.kept, reduced_dim=experts_dim)
  return mtf.to_int32(expert + dropped * experts_dim.size), slots.gate * (1.0 - dropped)


class EinsumDispatch(object):
  """Dispatch and combine as einsums with one-hot [O, G, S, E, C] tensors."""

  def __init__(self, slots, capacity_dim):
    self._dispatch = slots.kept * mtf.one_hot(mtf.to_int32(slots.position), capacity_dim,
                                              dtype=slots.kept.dtype)
    self._combine = self._dispatch * slots.gate

  def dispatch(self, x, output_shape):
    """[O, G, S, M] -> output_shape [O, E, G, C, M]."""
    return mtf.einsum([x, mtf.cast(self._dispatch, x.dtype)], output_shape)

  def combine(self, y, output_shape):
    """[O, E, G, C, M] -> output_shape [O, G, S, M]: sum over slots of gate * expert output."""
    return mtf.einsum([y, mtf.cast(self._combine, y.dtype)], output_shape)


class GatherDispatch(object):
  """Dispatch as a scatter and combine as a gather of each token's slot e * C + position, on
  each device's local groups; each is the other's gradient. Overflowed and padding tokens get
  the extra slot E * C: dispatch drops them, combine reads zeros there."""

  def __init__(self, slots, experts_dim, capacity_dim):
    self._experts_dim, self._capacity_dim = experts_dim, capacity_dim
    expert, self._gate = kept_expert(slots, experts_dim)
    # slot = e * C + position; dropped tokens: E * C + 0.
    position = mtf.to_int32(mtf.reduce_sum(slots.kept * slots.position, reduced_dim=experts_dim))
    self._slot = expert * capacity_dim.size + position

  def dispatch(self, x, output_shape):
    """[O, G, S, M] -> output_shape [O, E, G, C, M]."""
    return self._scatter(x, output_shape)

  def combine(self, y, output_shape):
    """[O, E, G, C, M] -> output_shape [O, G, S, M]: gate * the token's expert output."""
    return self._gather(y, output_shape) * mtf.cast(self._gate, y.dtype)

  def _scatter(self, x, output_shape):
    """x [O, G, S, M] into slots [O, E, G, C, M]."""
    num_experts, capacity = self._experts_dim.size, self._capacity_dim.size
    num_slots = num_experts * capacity

    def scatter(x, slot):
      o, g, _, m = [tf.shape(x)[i] for i in range(4)]
      # One segment per (local group, slot), plus a dropped-token segment per group.
      base = tf.reshape(tf.range(o * g) * (num_slots + 1), [o, g, 1])
      out = tf.math.unsorted_segment_sum(tf.reshape(x, [-1, m]), tf.reshape(slot + base, [-1]),
                                         o * g * (num_slots + 1))
      out = tf.reshape(out, [o, g, num_slots + 1, m])[:, :, :num_slots]
      return tf.transpose(tf.reshape(out, [o, g, num_experts, capacity, m]), [0, 2, 1, 3, 4])

    return mtf.slicewise(
        scatter, [x, self._slot], output_shape, x.dtype, _splittable(x.shape),
        grad_function=lambda op, dy: [self._gather(dy, x.shape), None], name="switch_scatter")

  def _gather(self, y, output_shape):
    """Slots y [O, E, G, C, M] back to tokens [O, G, S, M] (zeros for dropped tokens)."""

    def gather(y, slot):
      o, _, g, _, m = [tf.shape(y)[i] for i in range(5)]
      flat = tf.reshape(tf.transpose(y, [0, 2, 1, 3, 4]), [o, g, -1, m])
      flat = tf.pad(flat, [[0, 0], [0, 0], [0, 1], [0, 0]])  # the dropped-token slot: zeros
      return tf.gather(flat, slot, batch_dims=2)

    return mtf.slicewise(
        gather, [y, self._slot], output_shape, y.dtype, _splittable(output_shape),
        grad_function=lambda op, dx: [self._scatter(dx, y.shape), None], name="switch_gather")


def _splittable(grouped_shape):
  """The dimensions a scatter/gather may find split: all but the group and slot dimensions."""
  return [d for d in grouped_shape.dims
          if d.name not in ("group", "expert_unsplit", "expert_capacity")]

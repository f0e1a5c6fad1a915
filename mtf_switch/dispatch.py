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
  "auto": einsum when the graph is built for a TPU, else ragged where the layout allows and XLA's
    auto-clustering is off (TF_XLA_FLAGS --tf_xla_auto_jit: it cannot compile ragged's
    data-dependent segment shapes), else gather.

Expert choice (SwitchFFN.router = "expert_choice") has no Slots: its router gives each slot
its token (routing.ExpertChoice), EinsumDispatch.from_expert_choice builds MoE1D's one-hot
[O, G, E, C, S] tensors from it, and SlotGatherDispatch gathers the slots' tokens (its
"gather", and its "ragged": every slot holds a chosen token, there is no slack to skip).

Dropless routing (SwitchFFN.dropless_train / dropless_eval / dropless_predict, the last on by
default): assign_slots without a capacity keeps every used choice. The ragged dispatch then
computes exactly the real tokens' choices, as with a capacity; einsum and gather need slots and
use C = S (an expert can receive at most every token of a group, each token choosing an expert
once), so the experts compute E * S rows per group (E times a dense layer's) and the einsum's
[O, G, S, E, C = S] dispatch and combine tensors take 4 * S * E bytes per token each (float32);
check_dropless_einsum refuses them above DROPLESS_EINSUM_MAX_BYTES per device.
"""
import collections
import os
import re

import mesh_tensorflow as mtf
import numpy as np
import tensorflow.compat.v1 as tf
from tensorflow.python.tpu import tpu_function  # pylint: disable=g-direct-tensorflow-import

IMPLEMENTATIONS = ("auto", "einsum", "gather", "ragged")

Round = collections.namedtuple("Round", ["kept", "position", "gate"])
Round.__doc__ = """Where one of each token's choices goes (float32).

kept: [O, G, S, E] {0,1} the choice's expert, where the token got a slot there.
position: [O, G, S, E] the token's slot in that expert's queue (0-based; meaningful where kept).
gate: [O, G, S] the choice's gate, 0 where it was not kept.
"""

Slots = collections.namedtuple("Slots", ["expert_mask", "rounds", "requests"])
Slots.__doc__ = """The routing after capacity.

expert_mask: [O, G, S, E] {0,1} first choice of the real tokens before capacity (what the
  balance loss counts).
rounds: list of Round, one per router choice, in the order they were given capacity.
requests: [O, G, S] slots each token asked for: its used choices (1 with reroute; 0 padding).
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


# Bytes per device allowed for one float32 [O, G, S, E, C = S] tensor of the dropless einsum
# dispatch: 1 GiB, a sixteenth of a TPU v3 core's 16 GiB of HBM. Each Switch layer holds two of
# them (dispatch and combine, both kept for the backward pass) plus their activation-dtype
# copies, so a dozen Switch layers at the limit already exceed a core's HBM. Switch-Base on a
# v3-32 (32 groups of S = 1024 per core, E = 128): 168 MB with cf 1.25 (C = 10), 17 GB
# dropless (C = S = 1024; fits from group_size 64).
DROPLESS_EINSUM_MAX_BYTES = 1 << 30


def check_dropless_einsum(dispatch_shape, layout, mesh_shape, setting, inference=False):
  """Raises ValueError if the float32 einsum dispatch tensor `dispatch_shape` [O, G, S, E, C]
  takes more than DROPLESS_EINSUM_MAX_BYTES on one device (each dimension divided by the mesh
  axis the layout splits it over). `setting`: the gin parameter that asked for it; inference:
  whether it is SwitchFFN.dropless_predict (decoding, scoring, exports: on by default)."""
  local = [d.size // mtf.tensor_dim_to_mesh_dim_size(layout, mesh_shape, d)
           for d in dispatch_shape.dims]
  num_bytes = 4 * int(np.prod(local))
  if num_bytes <= DROPLESS_EINSUM_MAX_BYTES:
    return
  *groups, group_size, num_experts, capacity = local
  tokens = int(np.prod(groups)) * group_size
  # bytes = 4 * tokens * S * E: the largest group size that fits
  fitting = DROPLESS_EINSUM_MAX_BYTES // (4 * tokens * num_experts)
  smaller = ("lower SwitchFFN.group_size to at most %d, " % fitting) if fitting >= 1 else ""
  capped = ("route with a capacity (%s = False; at inference a request's answer then depends "
            "on the other requests of its batch)" if inference else
            "route with a capacity (%s = False)") % setting
  raise ValueError(
      "%s = True%s with the einsum dispatch (SwitchFFN.dispatch='einsum', or 'auto' on TPU) "
      "uses capacity C = S = %d: its one-hot dispatch tensor [groups, S, E, C] takes %d "
      "tokens x %d x %d experts x 4 bytes = %.2f GiB per device (float32; the combine tensor "
      "as much again), over the limit of %.2f GiB (mtf_switch.dispatch."
      "DROPLESS_EINSUM_MAX_BYTES). It grows as tokens x S x E: %suse SwitchFFN.dispatch="
      "'gather' (slots of tokens x E x d_model) or 'ragged' (off TPU, experts not split over "
      "the mesh: computes only the real tokens), or %s." % (
          setting, " (the default at inference: decoding, scoring and exports)" if inference
          else "", capacity, tokens, group_size, num_experts, num_bytes / 2.0 ** 30,
          DROPLESS_EINSUM_MAX_BYTES / 2.0 ** 30, smaller, capped))


def assign_slots(router, nonpadding, experts_dim, group_dim, capacity_dim,
                 batch_prioritized=False, reroute=False):
  """Gives the router's choices capacity slots: all first choices, then all second choices...

  Within a round, tokens queue in token order, or with batch_prioritized by decreasing top-1
  router probability (batch-prioritized routing, ST-MoE App. D). With reroute
  (no-token-left-behind, Switch paper App.), round j only routes the tokens that found no slot
  in rounds < j; otherwise every used choice is routed (top-k).

  Args:
    router: a routing.RouterOutput.
    nonpadding: float [O, G, S], 1 for real tokens, 0 for padding (padding is never dispatched
      and takes no capacity).
    experts_dim, group_dim, capacity_dim: the E, S and C dimensions; capacity_dim None for
      dropless routing: every used choice is kept (no capacity cut; positions, in token order,
      are then < S, the slots of the C = S dispatches). With no cut, the queue order (and so
      batch_prioritized) changes only which slot a token takes, not the outputs, and is not
      computed; with reroute, rounds after the first route nothing.
  Returns:
    Slots.
  """
  priority = None
  if batch_prioritized and capacity_dim is not None:
    priority = mtf.stop_gradient(mtf.reduce_max(router.router_probs, reduced_dim=experts_dim))
  first = router.choices[0].expert_index
  expert_mask = mtf.one_hot(first, experts_dim, dtype=tf.float32) * nonpadding
  filled = None  # [O, G, E] slots taken in earlier rounds
  waiting = nonpadding  # [O, G, S] tokens without a slot (reroute)
  rounds, requests = [], nonpadding
  for j, choice in enumerate(router.choices):
    mask = mtf.one_hot(choice.expert_index, experts_dim, dtype=tf.float32) * (
        waiting if reroute else nonpadding)
    if choice.candidate is not None:
      mask *= choice.candidate
    if j and not reroute:
      requests += mtf.reduce_sum(mask, reduced_dim=experts_dim)
    position = _queue_position(mask, group_dim, priority)
    if filled is not None:
      position += filled * mask
    kept = mask
    if capacity_dim is not None:
      kept *= mtf.to_float(mtf.less(position, float(capacity_dim.size)))
    rounds.append(Round(kept, position, choice.gate * mtf.reduce_sum(kept,
                                                                      reduced_dim=experts_dim)))
    taken = mtf.reduce_sum(kept, reduced_dim=group_dim)
    filled = taken if filled is None else filled + taken
    if reroute:
      waiting -= mtf.reduce_sum(kept, reduced_dim=experts_dim)
  return Slots(expert_mask, rounds, requests)


def _queue_position(mask, group_dim, priority):
  """Each token's place in its expert's queue: the number of earlier tokens of the group with
  the same expert, in token order or by decreasing priority [O, G, S]."""
  if priority is None:
    return mtf.cumsum(mask, group_dim, exclusive=True) * mask
  axis = mask.shape.dims.index(group_dim)

  def by_priority(mask, priority):
    # order: tokens by decreasing priority (ties in token order); rank: its inverse
    order = tf.argsort(-priority, axis=axis, stable=True)
    rank = tf.argsort(order, axis=axis)
    sorted_mask = tf.gather(mask, order, axis=axis, batch_dims=axis)
    queued = tf.cumsum(sorted_mask, axis=axis, exclusive=True)
    return tf.gather(queued, rank, axis=axis, batch_dims=axis) * mask

  return mtf.slicewise(by_priority, [mtf.stop_gradient(mask), priority], mask.shape, mask.dtype,
                       splittable_dims=[d for d in mask.shape.dims if d != group_dim],
                       name="batch_prioritized_position")


def check_implementation(implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError("Unknown SwitchFFN.dispatch %r; choose one of %s." % (
        implementation, ", ".join(IMPLEMENTATIONS)))


def choose(implementation, experts_split):
  """Resolves SwitchFFN.dispatch to "einsum", "gather" or "ragged" (see the module docstring).

  experts_split: whether the layout splits the expert weights over a mesh axis."""
  check_implementation(implementation)
  xla = xla_auto_clustering()
  if implementation == "auto":
    if tpu_function.get_tpu_context().number_of_shards is not None:
      return "einsum"
    return "gather" if experts_split or xla else "ragged"
  if implementation == "ragged" and experts_split:
    raise ValueError(
        "SwitchFFN.dispatch='ragged' needs every expert's weights on every device, but the "
        "layout splits `experts` or `expert_hidden` over the mesh: use 'gather' or 'auto'.")
  if implementation == "ragged" and xla:
    raise ValueError(
        "SwitchFFN.dispatch='ragged' cannot run under XLA's auto-clustering (TF_XLA_FLAGS=%r): "
        "its per-expert segment sizes depend on the routing, and XLA needs them at compile "
        "time. Use SwitchFFN.dispatch='gather' (or 'auto', which picks it), or unset "
        "--tf_xla_auto_jit." % os.environ.get("TF_XLA_FLAGS", ""))
  return implementation


def xla_auto_clustering():
  """Whether TF_XLA_FLAGS turns on XLA's auto-clustering (--tf_xla_auto_jit other than 0/-1)."""
  match = re.search(r"--tf_xla_auto_jit=(\S+)", os.environ.get("TF_XLA_FLAGS", ""))
  return bool(match) and match.group(1) not in ("0", "-1")


def kept_experts(slots, experts_dim, choices_dim):
  """(int32 [O, G, S, K] expert of each of a token's K = len(slots.rounds) choices, E where the
  choice has no slot (dropped, unused or padding); [O, G, S, K] gates, 0 there)."""
  experts = mtf.range(slots.expert_mask.mesh, experts_dim, tf.float32)
  ids = []
  for r in slots.rounds:
    missing = 1.0 - mtf.reduce_sum(r.kept, reduced_dim=experts_dim)
    ids.append(mtf.reduce_sum(r.kept * experts, reduced_dim=experts_dim) +
               missing * experts_dim.size)
  return (mtf.to_int32(mtf.stack(ids, choices_dim.name, axis=3)),
          mtf.stack([r.gate for r in slots.rounds], choices_dim.name, axis=3))


def chosen_experts(router, nonpadding, experts_dim, choices_dim):
  """kept_experts without a capacity (dropless, no rerouting), where every used choice is
  kept: the experts and gates come straight from the router's choices, with no slots (a few
  ops per choice where the slots take a few per expert: decoding runs them at every step)."""
  ids, gates = [], []
  for choice in router.choices:
    used = nonpadding if choice.candidate is None else nonpadding * choice.candidate
    # used: the choice's expert; unused or padding: E
    ids.append(mtf.to_float(choice.expert_index) * used + (1.0 - used) * experts_dim.size)
    gates.append(choice.gate * used)
  return (mtf.to_int32(mtf.stack(ids, choices_dim.name, axis=3)),
          mtf.stack(gates, choices_dim.name, axis=3))


class EinsumDispatch(object):
  """Dispatch and combine as einsums with one-hot tensors: [O, G, S, E, C] built from token
  choice's Slots, or [O, G, E, C, S] from expert choice (MoE1D's layouts of each)."""

  def __init__(self, dispatch, combine):
    self._dispatch, self._combine = dispatch, combine

  @classmethod
  def from_slots(cls, slots, capacity_dim):
    rounds = [r.kept * mtf.one_hot(mtf.to_int32(r.position), capacity_dim, dtype=r.kept.dtype)
              for r in slots.rounds]
    return cls(mtf.add_n(rounds), mtf.add_n([d * r.gate for d, r in zip(rounds, slots.rounds)]))

  @classmethod
  def from_expert_choice(cls, choice, group_dim):
    """routing.ExpertChoice: slot (e, c) holds token choice.token[e, c]."""
    one_hot = mtf.one_hot(choice.token, group_dim, dtype=tf.float32)
    return cls(one_hot * mtf.to_float(mtf.greater(choice.slot_gate, 0.0)),
               one_hot * choice.slot_gate)

  def dispatch(self, x, output_shape):
    """[O, G, S, M] -> output_shape [O, E, G, C, M]."""
    return mtf.einsum([x, mtf.cast(self._dispatch, x.dtype)], output_shape)

  def combine(self, y, output_shape):
    """[O, E, G, C, M] -> output_shape [O, G, S, M]: sum over slots of gate * expert output."""
    return mtf.einsum([y, mtf.cast(self._combine, y.dtype)], output_shape)


class GatherDispatch(object):
  """Dispatch as a scatter and combine as a gather of the slot e * C + position of each of a
  token's K choices, on each device's local groups; each is the other's gradient. Choices
  without a slot get the extra slot E * C: dispatch drops them, combine reads zeros there."""

  def __init__(self, slots, experts_dim, capacity_dim):
    self._experts_dim, self._capacity_dim = experts_dim, capacity_dim
    self._choices_dim = mtf.Dimension("choices", len(slots.rounds))
    expert, self._gate = kept_experts(slots, experts_dim, self._choices_dim)
    position = mtf.stack([mtf.reduce_sum(r.kept * r.position, reduced_dim=experts_dim)
                          for r in slots.rounds], self._choices_dim.name, axis=3)
    # slot = e * C + position; no slot: E * C + 0.
    self._slot = expert * capacity_dim.size + mtf.to_int32(position)

  def dispatch(self, x, output_shape):
    """[O, G, S, M] -> output_shape [O, E, G, C, M]."""
    dims = x.shape.dims
    x = mtf.broadcast(x, mtf.Shape(dims[:-1] + [self._choices_dim] + dims[-1:]))
    return self._scatter(x, output_shape)

  def combine(self, y, output_shape):
    """[O, E, G, C, M] -> output_shape [O, G, S, M]: sum of gate * the choice's expert output."""
    dims = output_shape.dims
    outputs = self._gather(y, mtf.Shape(dims[:-1] + [self._choices_dim] + dims[-1:]))
    return mtf.einsum([outputs, mtf.cast(self._gate, y.dtype)], output_shape)

  def _scatter(self, x, output_shape):
    """x [O, G, S, K, M] into slots [O, E, G, C, M]."""
    num_experts, capacity = self._experts_dim.size, self._capacity_dim.size
    num_slots = num_experts * capacity

    def scatter(x, slot):
      o, g, m = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[4]
      # One segment per (local group, slot), plus a no-slot segment per group.
      base = tf.reshape(tf.range(o * g) * (num_slots + 1), [o, g, 1, 1])
      out = tf.math.unsorted_segment_sum(tf.reshape(x, [-1, m]), tf.reshape(slot + base, [-1]),
                                         o * g * (num_slots + 1))
      out = tf.reshape(out, [o, g, num_slots + 1, m])[:, :, :num_slots]
      return tf.transpose(tf.reshape(out, [o, g, num_experts, capacity, m]), [0, 2, 1, 3, 4])

    return mtf.slicewise(
        scatter, [x, self._slot], output_shape, x.dtype, _splittable(x.shape),
        grad_function=lambda op, dy: [self._gather(dy, x.shape), None], name="switch_scatter")

  def _gather(self, y, output_shape):
    """Slots y [O, E, G, C, M] back to choices [O, G, S, K, M] (zeros where no slot)."""

    def gather(y, slot):
      o, g, m = tf.shape(y)[0], tf.shape(y)[2], tf.shape(y)[4]
      flat = tf.reshape(tf.transpose(y, [0, 2, 1, 3, 4]), [o, g, -1, m])
      flat = tf.pad(flat, [[0, 0], [0, 0], [0, 1], [0, 0]])  # the no-slot slot: zeros
      return tf.gather(flat, slot, batch_dims=2)

    return mtf.slicewise(
        gather, [y, self._slot], output_shape, y.dtype, _splittable(output_shape),
        grad_function=lambda op, dx: [self._scatter(dx, y.shape), None], name="switch_gather")


def _splittable(grouped_shape):
  """The dimensions a scatter/gather may find split: all but the group and slot dimensions."""
  return [d for d in grouped_shape.dims
          if d.name not in ("group", "choices", "expert_unsplit", "expert_capacity")]


class SlotGatherDispatch(object):
  """Expert choice's slots [O, E, G, C] each know their token: dispatch gathers the tokens
  into the slots, combine scatter-adds gate * expert output back to the tokens (each the
  other's gradient). Every slot is computed; there is no slack (each expert takes C tokens),
  so this serves as both the gather and the ragged dispatch of expert choice."""

  def __init__(self, choice, group_dim):
    self._group_dim = group_dim
    # Slots holding padding (fewer than C real tokens in the group) read and write nothing:
    # token S, one past the group.
    empty = mtf.to_int32(mtf.equal(choice.slot_gate, 0.0))
    self._token = choice.token * (1 - empty) + empty * group_dim.size
    self._gate = choice.slot_gate

  def dispatch(self, x, output_shape):
    """[O, G, S, M] -> output_shape [O, E, G, C, M]."""
    return self._gather(x, output_shape)

  def combine(self, y, output_shape):
    """[O, E, G, C, M] -> output_shape [O, G, S, M]: sum of gate * expert output per token."""
    return self._scatter(y * mtf.cast(self._gate, y.dtype), output_shape)

  def _gather(self, x, output_shape):
    def gather(x, token):
      x = tf.pad(x, [[0, 0], [0, 0], [0, 1], [0, 0]])  # token S: zeros
      return tf.transpose(tf.gather(x, token, axis=2, batch_dims=2), [0, 2, 1, 3, 4])

    return mtf.slicewise(
        gather, [x, self._token], output_shape, x.dtype, _splittable(x.shape),
        grad_function=lambda op, dy: [self._scatter(dy, x.shape), None],
        name="expert_choice_gather")

  def _scatter(self, y, output_shape):
    group_size = self._group_dim.size

    def scatter(y, token):
      o, e, g, c, m = (tf.shape(y)[i] for i in range(5))
      base = tf.reshape(tf.range(o * g) * (group_size + 1), [o, g, 1, 1])
      ids = tf.reshape(token + base, [-1])  # [o, g, E, C] flat, one spare row per group
      rows = tf.reshape(tf.transpose(y, [0, 2, 1, 3, 4]), [-1, m])
      out = tf.math.unsorted_segment_sum(rows, ids, o * g * (group_size + 1))
      return tf.reshape(out, [o, g, group_size + 1, m])[:, :, :group_size]

    return mtf.slicewise(
        scatter, [y, self._token], output_shape, y.dtype, _splittable(output_shape),
        grad_function=lambda op, dx: [self._gather(dx, y.shape), None],
        name="expert_choice_scatter")

"""The experts: one feed-forward network per expert, weights carry an `experts` dimension.

Two ways to apply them, with the same variables (names and shapes of mesh-tensorflow's MoE1D:
wi, or wi_0/wi_1 for gated units, and wo, each [experts, in, out]):
  expert_ffn: over capacity slots [O, E, G, C, M] (einsum/gather dispatch; experts may be split
    over a mesh axis). Every slot is computed, filled or not: E * C = cf * S rows per group.
  ragged_expert_ffn: over the tokens [O, G, S, M] themselves, each multiplied by its own
    expert's weights (rows grouped by expert on each device, one matmul per expert); only kept
    tokens are computed. Outside training, when a device holds no more rows than experts (as
    when decoding), each row is multiplied by its own gathered expert weights; with up to
    BLOCK_ROWS rows per expert, all experts run as one batched matmul per weight over blocks
    padded to the busiest expert's rows. Needs every expert's weights on every device;
    activations are reimplemented in TensorFlow (ACTIVATIONS: every elementwise activation of
    mtf).
"""
import collections

import mesh_tensorflow as mtf
import numpy as np
import tensorflow.compat.v1 as tf


def expert_ffn(expert_inputs, experts_dim, hidden_dim, output_dim, activation, dropout_rate,
               train, variable_dtype, kernel_initializer, multiplicative_bias=False):
  """y = wo . (act(wi . x) [* b]) per expert; GEGLU when activation=["gelu", "linear"]; b is the
  optional learned multiplicative bias [experts, expert_hidden] (see multiplicative_bias)."""
  h = mtf.layers.dense_product(
      expert_inputs, reduced_dims=expert_inputs.shape.dims[-1:], new_dims=[hidden_dim],
      expert_dims=[experts_dim], activation_functions=activation, use_bias=False,
      variable_dtype=variable_dtype, kernel_initializer=kernel_initializer, name="wi")
  if multiplicative_bias:
    h *= mtf.cast(_multiplicative_bias(expert_inputs.mesh, experts_dim, hidden_dim,
                                       variable_dtype), h.dtype)
  if train and dropout_rate > 0.0:
    h = mtf.dropout(h, is_training=True, keep_prob=1.0 - dropout_rate)
  return mtf.layers.dense(
      h, output_dim, reduced_dims=[hidden_dim], expert_dims=[experts_dim], use_bias=False,
      variable_dtype=variable_dtype, kernel_initializer=kernel_initializer, name="wo")


def _multiplicative_bias(mesh, experts_dim, hidden_dim, variable_dtype):
  """b [experts, expert_hidden], initialised to ones: h <- h * b (ST-MoE App. C's multiplicative
  bias; with b = 1 the expert is the plain FFN)."""
  return mtf.get_variable(mesh, "multiplicative_bias", mtf.Shape([experts_dim, hidden_dim]),
                          initializer=tf.ones_initializer(), dtype=variable_dtype)


def ragged_expert_ffn(tokens, expert_id, experts_dim, hidden_dim, output_dim, activation,
                      dropout_rate, train, variable_dtype, kernel_initializer, shard_dims,
                      multiplicative_bias=False):
  """expert_ffn for tokens [O, G, S, M], each sent to the experts expert_id [O, G, S, K] (int32;
  E = no expert, whose output is 0); returns [O, G, S, K, N]. One slicewise op per device: the
  (token, choice) rows are gathered into per-expert segments (padded to a multiple of ROWS),
  each segment is multiplied by its expert's weights, and the results are gathered back.
  shard_dims: O and G with sizes = how many ways the layout splits them; weight gradients are
  summed over them (mesh-tensorflow's all-reduce)."""
  model_dim = tokens.shape.dims[-1]
  choices = expert_id.shape.dims[-1].size
  activations = activation if isinstance(activation, list) else [activation]
  tf_activations = [_tf_activation(a) for a in activations]

  def weight(name, in_dim, out_dim):
    with tf.variable_scope(name):
      return mtf.get_variable(
          tokens.mesh, "kernel", mtf.Shape([experts_dim, in_dim, out_dim]),
          initializer=kernel_initializer([in_dim], [out_dim]), dtype=variable_dtype)

  weights = [weight("wi_%d" % i if len(activations) > 1 else "wi", model_dim, hidden_dim)
             for i in range(len(activations))] + [weight("wo", hidden_dim, output_dim)]
  if multiplicative_bias:
    weights.append(_multiplicative_bias(tokens.mesh, experts_dim, hidden_dim, variable_dtype))
  keep_prob = 1.0 - dropout_rate if train else 1.0

  def forward(x, ids, *ws):
    rows = tf.reshape(x, [-1, model_dim.size])
    tokens = x.shape[:-1].num_elements()  # on this device (static)
    few_rows = not train and tokens is not None  # the row-count paths below (inference)
    if few_rows and per_token_weights(tokens * choices, experts_dim.size, ws):
      return _per_token(rows, ids, ws, tf_activations, choices, experts_dim.size,
                        multiplicative_bias)
    blocks = few_rows and tokens * choices <= BLOCK_ROWS * experts_dim.size
    segments, back = _segments(tf.reshape(ids, [-1]), experts_dim.size, small=not train,
                               uniform=blocks)
    # segment entries index (token, choice) pairs: token = entry // K (padding -> zero row)
    xs = tf.gather(_with_zero_row(rows), segments.source // choices)
    hidden = _hidden_function(tf_activations)
    if blocks:
      y = _blocks(xs, ws, hidden, experts_dim.size, multiplicative_bias)
    else:
      y = _per_expert(tf.split(xs, segments.sizes, num=experts_dim.size), ws, hidden,
                      multiplicative_bias, keep_prob)
    y = tf.gather(_with_zero_row(y), back)
    return tf.reshape(y, tf.concat([tf.shape(ids), [output_dim.size]], 0))

  def grad(op, dy):
    x, ids, *ws = op.inputs

    def backward(x, ids, *rest):
      *ws, y, dy = rest
      grads = tf.gradients(y, [x] + ws, grad_ys=dy)
      if any(g is None for g in grads):
        raise ValueError("ragged_expert_ffn: the gradient lost its forward pass; use "
                         "SwitchFFN.dispatch='gather'.")
      return tuple([grads[0]] + [tf.reshape(g, [1] * len(shard_dims) + g.shape.as_list())
                                 for g in grads[1:]])

    outputs = mtf.SlicewiseOperation(
        backward, [x, ids] + ws + [op.outputs[0], dy],
        [x.shape] + [mtf.Shape(shard_dims + w.shape.dims) for w in ws],
        [x.dtype] + [w.dtype for w in ws],
        splittable_dims=x.shape.dims[:-2] + shard_dims, grad_function=0,
        name="ragged_expert_ffn_grad").outputs
    return [outputs[0], None] + [mtf.reduce_sum(g, output_shape=w.shape)
                                 for g, w in zip(outputs[1:], ws)]

  return mtf.slicewise(forward, [tokens, expert_id] + weights,
                       mtf.Shape(expert_id.shape.dims + [output_dim]), tokens.dtype,
                       splittable_dims=tokens.shape.dims[:-2], grad_function=grad,
                       name="ragged_expert_ffn")


# Row counts per expert change every step; padding each expert's segment to a multiple of ROWS
# lets the CPU matmul kernels (oneDNN) reuse their cached per-shape primitives (unpadded, dynamic
# row counts cost ~5%). 32 rather than 128: at E = 32 an expert gets ~64 decoder rows per step,
# which 128 doubled (benchmarks/RESULTS.md, layer_overhead --rows). Outside training
# (small=True) a segment of fewer than ROWS rows is padded to the next power of two instead, so
# that decoding (a few tokens per step) does not compute ROWS rows per expert it uses.
ROWS = 32
# Outside training, at most this many bytes of gathered expert weights per device (see
# per_token_weights).
PER_TOKEN_MAX_BYTES = 1 << 28
# Outside training, with at most this many (token, choice) rows per expert on a device on
# average (decoding at a batch above E), all experts run as one batched matmul per weight over
# equal blocks (_blocks): a few padding rows cost less than a few ops per expert.
BLOCK_ROWS = 4


def per_token_weights(entries, num_experts, weights):
  """Whether to multiply each of `entries` (token, choice) rows by its own expert's gathered
  weights (_per_token) rather than by per-expert segments: when there are no more rows than
  experts (decoding: a token per sequence and step), so that the gathered copies weigh no more
  than the distinct experts the segments would read, and they fit PER_TOKEN_MAX_BYTES. It does
  a dense layer's arithmetic per row and a constant number of ops, where the segments take a
  few ops per expert."""
  per_row = sum(w.shape[1:].num_elements() * w.dtype.size for w in weights)
  return entries <= num_experts and entries * per_row <= PER_TOKEN_MAX_BYTES


def _hidden_function(activations):
  """One expert's hidden activations on its rows, h = prod_k act_k(x wi_k), as a tf.function:
  the graph then holds one call per expert and one for its gradient, where the inlined
  activations and their broadcasting gradients took ~100 nodes per expert (graph building,
  graph.pbtxt and every checkpoint's meta graph grow with the node count). TensorFlow inlines
  the calls when it runs the graph. Random ops stay outside: every inlined copy of a function
  would draw the same numbers."""

  @tf.function(autograph=False)
  def hidden(x, *wi):
    h = None
    for act, w in zip(activations, wi):
      factor = act(tf.matmul(x, w))
      h = factor if h is None else h * factor
    return h

  return hidden


def _per_expert(xs, weights, hidden, multiplicative_bias, keep_prob):
  """The experts for xs, E segments [R_e, M]: one matmul per expert and weight (hidden:
  _hidden_function); [sum R_e, N]."""
  # (not w[e]: its gradient is a dense [E, K, N])
  per_expert = [tf.unstack(w) for w in weights]
  bias = per_expert.pop() if multiplicative_bias else None
  *wi, wo = per_expert
  ys = []
  for e, x_e in enumerate(xs):
    h = hidden(x_e, *[w[e] for w in wi])
    if bias is not None:
      h *= bias[e]
    if keep_prob < 1.0:  # outside the function: each expert draws its own mask
      h = tf.nn.dropout(h, rate=1.0 - keep_prob)
    ys.append(tf.matmul(h, wo[e]))
  return tf.concat(ys, 0)


def _blocks(xs, weights, hidden, num_experts, multiplicative_bias):
  """The experts for xs [E * R, M]: every expert's R rows (a uniform segment), one batched
  matmul per weight (hidden: _hidden_function); [E * R, N]."""
  *wi, wo = weights[:-1] if multiplicative_bias else weights
  h = hidden(tf.reshape(xs, [num_experts, -1, xs.shape[-1]]), *wi)
  if multiplicative_bias:
    h *= weights[-1][:, tf.newaxis, :]
  return tf.reshape(tf.matmul(h, wo), [-1, wo.shape[-1]])


def _per_token(rows, ids, weights, activations, choices, num_experts, multiplicative_bias):
  """The experts for rows [T, M] (tokens) and ids [..., K] (each token's K experts, E = none):
  every (token, choice) row times its gathered expert weights; [..., K, N]."""
  flat_ids = tf.reshape(ids, [-1])
  entries = tf.gather(rows, tf.range(tf.size(flat_ids)) // choices) if choices > 1 else rows
  expert = tf.minimum(flat_ids, num_experts - 1)
  # One row (batch-1 decoding): w[e] is a dim-0 slice, which TensorFlow returns without copying;
  # a gather copies each chosen expert's matrix.
  one_row = flat_ids.shape[0] == 1

  def pick(w):
    return w[expert[0]] if one_row else tf.gather(w, expert)

  def matmul(x, w):
    return tf.matmul(x, pick(w)) if one_row else tf.einsum("rm,rmh->rh", x, pick(w))

  wi, wo = weights[:len(activations)], weights[len(activations)]
  h = None
  for act, w in zip(activations, wi):
    factor = act(matmul(entries, w))
    h = factor if h is None else h * factor
  if multiplicative_bias:
    h *= pick(weights[-1])
  y = matmul(h, wo)
  y *= tf.cast(flat_ids < num_experts, y.dtype)[:, tf.newaxis]  # no expert: 0
  return tf.reshape(y, tf.concat([tf.shape(ids), [tf.shape(y)[-1]]], 0))


Segments = collections.namedtuple("Segments", ["source", "sizes"])


def _next_power_of_two(n):
  """2^ceil(log2(n)) of int32 n >= 1 (n < 2^16), 0 for 0."""
  m = n - 1
  for shift in (1, 2, 4, 8):
    m = tf.bitwise.bitwise_or(m, tf.bitwise.right_shift(m, shift))
  return tf.where(n > 0, m + 1, tf.zeros_like(n))


def _segments(ids, num_experts, small=False, uniform=False):
  """Layout of the padded per-expert row buffer for the expert ids [T] of T entries
  (num_experts = no expert). small: segments under ROWS rows padded to a power of two.
  uniform: every segment as long as the longest (for _blocks).

  Returns (Segments(source: [R] entry of each buffer row, T for padding; sizes: [E] rows per
  expert segment), back: [T] buffer row of each entry, R for entries without an expert)."""
  num_tokens = tf.shape(ids)[0]
  counts = tf.math.bincount(ids, minlength=num_experts + 1, maxlength=num_experts + 1)
  routed = counts[:num_experts]  # entries per expert
  if uniform:
    sizes = tf.fill([num_experts], tf.reduce_max(routed))
  else:
    sizes = (routed + ROWS - 1) // ROWS * ROWS
    if small:
      sizes = tf.where(routed < ROWS, _next_power_of_two(routed), sizes)
  starts = tf.concat([tf.cumsum(sizes, exclusive=True), [tf.reduce_sum(sizes)]], 0)
  order = tf.argsort(ids, stable=True)
  sorted_ids = tf.gather(ids, order)
  rank = tf.range(num_tokens) - tf.gather(tf.cumsum(counts, exclusive=True), sorted_ids)
  # dropped tokens (id E) all point at the zero row after the buffer
  row_sorted = tf.gather(starts, sorted_ids) + rank * tf.cast(sorted_ids < num_experts, tf.int32)
  back = tf.gather(row_sorted, tf.math.invert_permutation(order))
  kept = sorted_ids < num_experts
  source = tf.tensor_scatter_nd_update(
      tf.fill([starts[-1]], num_tokens), tf.boolean_mask(row_sorted, kept)[:, tf.newaxis],
      tf.boolean_mask(order, kept))
  return Segments(source, sizes), back


def _with_zero_row(rows):
  return tf.pad(rows, [[0, 1], [0, 0]])  # also when rows is empty (every token dropped)


# The activation names SwitchFFN.activation accepts, for every dispatch: mesh-tensorflow's
# elementwise activations (dense_product looks a name up as `mtf.<name>`; "linear" or None is
# none), each as TensorFlow computes it in mtf, for the ragged experts.
ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": tf.nn.relu,
    "gelu": lambda x: x * (0.5 * (1.0 + tf.tanh(np.sqrt(2 / np.pi) *
                                                (x + 0.044715 * x * x * x)))),
    "swish": lambda x: x * tf.sigmoid(x),
    "sigmoid": tf.sigmoid,
    "tanh": tf.tanh,
    "elu": tf.nn.elu,
    "selu": tf.nn.selu,
    "softplus": tf.math.softplus,
    "leaky_relu": lambda x: tf.nn.leaky_relu(x, 0.2),  # mtf.leaky_relu's default alpha
    "squared_relu": lambda x: tf.square(tf.nn.relu(x)),
}


def _tf_activation(name):
  """The TensorFlow function of a mesh-tensorflow activation name (as mtf computes it)."""
  if name is None:
    name = "linear"
  if name not in ACTIVATIONS:  # SwitchFFN's constructor refuses other names
    raise ValueError("SwitchFFN.activation %r is not one of %s." % (
        name, ", ".join(sorted(ACTIVATIONS))))
  return ACTIVATIONS[name]

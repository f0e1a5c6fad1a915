"""Routing metrics of a Switch layer as mesh-tensorflow scalar summaries.

Names are `switch/<layer>/<metric>`, <layer> being the layer's scope without /MoE1D (e.g.
`switch/encoder/block_001/layer_003/dropped_fraction`). In training, t5_mesh_transformer writes
them to the model directory with the first step and then every 100 steps: through the TPU host
call with `tpu_estimator_model_fn.tpu_summaries = True` (gin/runs/pretrain_c4.gin), as plain TF
summaries off TPU (patches.py). In evaluation (perplexity_eval) they are evaluation metrics,
means over the eval batches weighted by each batch's tokens, in the eval directory's events
(patches.py). Over R routing
requests (one per used choice of a real token; one per token with no-token-left-behind; with
expert choice, one per (expert, real token) it took: nothing is dropped):

  expert_fraction/<i>  requests served by expert i / R
  dropped_fraction     requests that found no slot / R  (sum_i expert_fraction_i = 1 - this)
  unrouted_fraction    real tokens that got no expert at all / real tokens (= dropped_fraction
                       for top-1; with top-2, a token whose second choice is dropped is routed)
  multi_expert_fraction  real tokens that reached two experts or more / real tokens (0 for
                       top-1; expert choice gives some tokens several experts, others none)
  router_entropy       mean over real tokens of -sum_i p_i(x) log p_i(x), p(x) = softmax(h(x))
                       over experts (for every router, expert choice included)
  top1_gate            mean over real tokens of the first choice's gate (expert choice: of the
                       largest gate, 0 for a token no expert took)
  balance_loss         L_B = E sum_i f_i P_i (before c_B)
  z_loss               L_z = mean logsumexp(h(x))^2 (before c_z)
  tokens               real tokens in the batch (an evaluation weights each batch by it)
"""
import collections
import re
import weakref

import mesh_tensorflow as mtf
import tensorflow.compat.v1 as tf

PREFIX = "switch"
_LOWERED = weakref.WeakKeyDictionary()  # tf.Graph -> {tag: TF scalar} of the lowered summaries
NAMES = ("expert_fraction", "dropped_fraction", "unrouted_fraction", "multi_expert_fraction",
         "router_entropy", "top1_gate", "balance_loss", "z_loss", "tokens")
_TAG = re.compile(r"^%s/(.+)/(expert_fraction/\d+|%s)$" % (
    PREFIX, "|".join(n for n in NAMES if n != "expert_fraction")))


def parse(tag):
  """(layer, metric) of a Switch summary tag, e.g. ("encoder/block_000/layer_003",
  "expert_fraction/7"); None for any other tag."""
  match = _TAG.match(tag)
  return match.groups() if match else None


Routed = collections.namedtuple("Routed", ["served", "requests", "top_gate", "logits"])
Routed.__doc__ = """What any router did, for the summaries (float32).

served: [O, G, S, E] {0,1} token s reached expert e (after capacity).
requests: [O, G, S] slots the token asked for (for expert choice: those it got).
top_gate: [O, G, S] the first choice's gate (token choice, before capacity) or the largest gate
  (expert choice, 0 for a token no expert took).
logits: [O, G, S, E] the router logits h(x).
"""


def record(layer, routed, nonpadding, experts_dim, balance_loss, z_loss):
  """Adds the summaries of one layer (scope name `layer`) to the mesh-tensorflow graph."""
  requests = mtf.reduce_sum(routed.requests * nonpadding)
  served_mask = routed.served * nonpadding
  kept = mtf.reduce_sum(served_mask, output_shape=mtf.Shape([experts_dim]))
  served = kept / mtf.maximum(requests, 1.0)
  num_tokens = mtf.reduce_sum(nonpadding)
  tokens = mtf.maximum(num_tokens, 1.0)
  probs = mtf.softmax(routed.logits, reduced_dim=experts_dim)
  entropy = -mtf.reduce_sum(probs * mtf.log(probs + 1e-9), reduced_dim=experts_dim)
  reached = mtf.reduce_sum(served_mask, reduced_dim=experts_dim)  # [O, G, S]
  values = {
      # From counts (exact in float32 below 2^24), so that dropless routing reports exactly 0.
      "dropped_fraction": (requests - mtf.reduce_sum(kept)) / mtf.maximum(requests, 1.0),
      "unrouted_fraction": (num_tokens - mtf.reduce_sum(mtf.minimum(reached, 1.0))) / tokens,
      "multi_expert_fraction": mtf.reduce_sum(mtf.to_float(mtf.greater(reached, 1.0))) / tokens,
      "router_entropy": mtf.reduce_sum(entropy * nonpadding) / tokens,
      "top1_gate": mtf.reduce_sum(routed.top_gate * nonpadding) / tokens,
      "balance_loss": balance_loss,
      "z_loss": z_loss,
      "tokens": num_tokens,
  }
  for i, fraction in enumerate(mtf.split(served, experts_dim, experts_dim.size)):
    values["expert_fraction/%d" % i] = mtf.reduce_sum(fraction)
  # An empty variable scope, so that the names do not depend on where the layer is built.
  with tf.variable_scope(tf.VariableScope(tf.AUTO_REUSE, name=""), auxiliary_name_scope=False):
    for name, value in values.items():
      mtf.scalar_summary("%s/%s/%s" % (PREFIX, layer, name), mtf.to_float(value))


def lowered(tag, value):
  """Notes the TF value of a summary lowered into the default graph (for evaluation metrics)."""
  _LOWERED.setdefault(tf.get_default_graph(), {})[tag] = value


def lowered_values(graph):
  """{tag: TF scalar} of the Switch summaries lowered into `graph`."""
  return dict(_LOWERED.get(graph, {}))

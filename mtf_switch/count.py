r"""Parameter and FLOP counter: `python -m mtf_switch.count --gin_file=gin/models/switch_base.gin`.

Builds the model's Mesh TensorFlow graph from gin, exactly as t5_mesh_transformer would, for one
sequence of `--inputs_length` / `--targets_length` tokens, and prints one JSON object. Nothing is
allocated: mtf variables are graph metadata until lowering, so Switch-C (1.6T parameters) counts
in seconds.

  params            trainable parameters (embeddings included, shared ones once)
  expert_params     parameters of expert weights (variables with an `experts` dimension)
  dense_params      params - expert_params
  embedding_params  parameters of variables with a vocabulary dimension
  flops_per_sequence  forward-pass FLOPs in the style of Kaplan et al. (2020): 2 per
      multiply-add of the weight matmuls (the output projection included, the embedding lookup
      and the routers excluded) and of attention's QK^T (Kaplan's 2 n_ctx d_attn per layer).
      An expert weight counts only for the tokens routed to it (k of E experts, paper Sec. 2;
      k = SwitchFFN.num_selected_experts; with expert choice the E * C / S experts a token
      reaches on average), not for the capacity slack; elementwise ops, norms
      and softmaxes are not counted.
  router_flops      the routers' matmuls (not in flops_per_sequence: the paper's counts leave
      them out)
  dispatch_flops    one-hot dispatch/combine einsums (data movement on TPU; not in the total)

Switch layers are built with SwitchFFN.dispatch = "einsum", the paper's TPU graph.

If the gin files bind `utils.run.mesh_shape` and `utils.run.layout_rules` (e.g. a file from
gin/layouts/, with utils.tpu_mesh_shape.tpu_topology for @utils.tpu_mesh_shape()), the counter
checks that the layout divides every dimension of the model, building one sequence per slice of
the batch mesh axis. matmul_flops_per_sequence and dispatch_flops depend on that grouping;
the other counts do not.
"""
import json
import sys

from absl import app
from absl import flags
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import layers
from mtf_switch import layouts
from mtf_switch import routing

flags.DEFINE_integer("inputs_length", 512, "Encoder tokens per sequence (paper: 512).")
flags.DEFINE_integer("targets_length", 114, "Decoder tokens per sequence (paper: 114).")
flags.DEFINE_integer("vocab_size", 32100,
                     "Vocabulary size before mesh-tensorflow pads it to a multiple of 128 "
                     "(T5's SentencePiece model: 32000 pieces + 100 sentinels).")

EXPERTS_DIM = "experts"
STACKS = ("encoder", "decoder")


def count(gin_files, gin_params=(), inputs_length=512, targets_length=114, vocab_size=32100):
  """Parses gin (config.parse), builds the graph, returns the counts dict."""
  config.parse(gin_files, gin_params)
  # Count the paper's (TPU) graph: with one-hot einsum dispatch every expert weight is a matmul.
  gin.bind_parameter("SwitchFFN.dispatch", "einsum")
  mesh_shape, layout_rules = _layout()
  with tf.Graph().as_default():
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "count_mesh")
    model = mtf_utils.build_model(
        model_type=gin.query_parameter("utils.run.model_type")
        if _bound("utils.run.model_type") else "bitransformer",
        input_vocab_size=vocab_size, output_vocab_size=vocab_size,
        layout_rules=layout_rules, mesh_shape=mesh_shape)
    lengths = {"encoder": inputs_length, "decoder": targets_length}
    # One sequence per slice of the batch mesh axis, so that the layout can split the batch.
    batch = mtf.Dimension("batch", 1)
    batch = mtf.Dimension("batch", mtf.tensor_dim_to_mesh_dim_size(layout_rules, mesh_shape,
                                                                   batch))

    def ids(length):
      dim = mtf.Dimension("length", length)
      return mtf.import_tf_tensor(mesh, tf.ones([batch.size, length], tf.int32),
                                  mtf.Shape([batch, dim]))

    model.call_simple(inputs=ids(inputs_length), targets=ids(targets_length),
                      compute_loss=False, mode=tf.estimator.ModeKeys.EVAL,
                      variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.float32))
    if mesh_shape.ndims:
      layouts.check(graph, mesh_shape, layout_rules)
    result = _count_params(graph)
    experts_per_token = [(layer["scope"], layer["experts_per_token"])
                         for layer in map(json.loads, tf.get_collection(layers.LAYERS))]
    result.update(_count_flops(graph, lengths, batch.size, experts_per_token))
    return result


def _bound(name):
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False


def _layout():
  """mesh_shape and layout_rules bound for utils.run (an empty mesh if none is known)."""
  mesh_shape = gin.query_parameter("utils.run.mesh_shape") if _bound("utils.run.mesh_shape") \
      else ""
  if isinstance(mesh_shape, gin.config.ConfigurableReference):  # @utils.tpu_mesh_shape()
    mesh_shape = mtf_utils.tpu_mesh_shape() \
        if _bound("utils.tpu_mesh_shape.tpu_topology") else ""
  layout_rules = gin.query_parameter("utils.run.layout_rules") \
      if _bound("utils.run.layout_rules") else ""
  return mtf.convert_to_shape(mesh_shape), mtf.convert_to_layout_rules(layout_rules)


def _count_params(graph):
  params = expert = embedding = 0
  for v in graph.trainable_variables:
    names = v.shape.dimension_names
    params += v.shape.size
    expert += v.shape.size if EXPERTS_DIM in names else 0
    embedding += v.shape.size if "vocab" in names else 0
  return {"params": params, "expert_params": expert, "dense_params": params - expert,
          "embedding_params": embedding}


def _source(tensor):
  """The operation behind an einsum operand, looking through casts, reshapes and renames."""
  op = tensor.operation
  while type(op).__name__ in ("CastOperation", "ReshapeOperation", "RenameOperation"):
    op = op.inputs[0].operation
  return op


def _count_flops(graph, lengths, batch_size, experts_per_token):
  """FLOPs of every matrix product (einsum with a reduced dimension) of the graph, per sequence.

  flops_per_sequence follows the paper (Table 9) and Kaplan et al. (2020): a weight W in a stack
  of T tokens costs 2 |W| T (2 |W| T k / E for expert weights: k experts per token), whatever
  length it is applied to (the decoder's key/value projections of the 512 encoder tokens count
  for the 114 decoder tokens); attention context costs 2 n_q n_kv d_attn per layer (QK^T); the
  output projection counts, embedding lookups (one-hot einsums) and routers do not.
  matmul_flops_per_sequence is what the graph computes: every product at its real size, expert
  weights over all capacity slots, dispatch and combine included.
  """
  routers = set(routing.ALL_SCOPES)
  kaplan = router = dispatch_total = matmul = 0
  for op in graph.operations:
    if not isinstance(op, mtf.ops.EinsumOperation):
      continue
    out_dims = set(op.outputs[0].shape.dims)
    dims = {d for t in op.inputs for d in t.shape.dims} | out_dims
    sources = [_source(t) for t in op.inputs]
    if dims == out_dims or any(isinstance(s, mtf.ops.OneHotOperation) for s in sources):
      continue  # elementwise product, or a lookup (one-hot x table)
    flops = 2 * mtf.Shape(sorted(dims, key=lambda d: d.name)).size // batch_size
    matmul += flops
    weights = [s for s in sources if isinstance(s, mtf.Variable)]
    stack = op.name.split("/")[0]
    if weights:
      shape = weights[0].outputs[0].shape
      active = shape.size
      if EXPERTS_DIM in shape.dimension_names:  # k experts of E per token
        k = [k for scope, k in experts_per_token if weights[0].name.startswith(scope)]
        active = int(round(active * k[0] / shape.get_dim_by_name(EXPERTS_DIM).size))
      if stack not in lengths:
        raise ValueError("Cannot tell the stack (%s) of the weight matmul %s." %
                         ("/".join(STACKS), op.name))
      if set(weights[0].name.split("/")) & routers:
        router += 2 * active * lengths[stack]
      else:
        kaplan += 2 * active * lengths[stack]
    elif any(d.name in ("expert_unsplit", EXPERTS_DIM) for d in dims):
      dispatch_total += flops
    elif any(d.name == "memory_length" for d in out_dims):  # attention logits QK^T
      kaplan += flops
  return {"flops_per_sequence": kaplan, "router_flops": router,
          "dispatch_flops": dispatch_total, "matmul_flops_per_sequence": matmul}


def main(argv):
  del argv
  fl = flags.FLAGS
  try:
    result = count(fl.gin_file or (), fl.gin_param or (), fl.inputs_length, fl.targets_length,
                   fl.vocab_size)
  except ValueError as e:
    sys.exit("error: %s" % e)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

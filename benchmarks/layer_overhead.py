"""Training step time of a Switch model, its FLOP-matched dense twin and the same model with
mesh-tensorflow's MoE1D(moe_gating="switch"), measured in one run on this machine's CPU.

  python benchmarks/layer_overhead.py [--steps 4] [--rounds 6] [--dispatch auto]

Configuration (issue 3): d_model 256, GEGLU d_ff 1024, 4+4 layers, every FFN sparse (8 experts of
d_ff 1024, group size 1024, capacity factor 1.25), inputs 256 / targets 64, 32 sequences
(8192 input tokens) per batch, the default corpus' vocabulary size (4196 -> 4224), Adafactor,
float32, one CPU device. Inputs are fixed random ids, so only the model is timed. Each round
times `steps` training steps of every model in turn (after 3 warm-up steps); the result is the
median over rounds. Prints a markdown table, then a JSON line with `switch_over_dense` and
`moe1d_over_dense` (step-time ratios).

--rows 128,32,8: one switch model per value of experts.ROWS (each expert's rows are padded to
a multiple of it in training), all timed in the same rounds.

--profile: then traces --profile steps of each model (TensorFlow's step stats, after the timed
rounds) and prints where the time goes: each op's run time summed (over both cores, so the sum
exceeds the wall time) and averaged per step, by part of the model (CATEGORIES), and each
model's difference to dense.
"""
import argparse
import collections
import json
import statistics
import time

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import numpy as np
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import experts

D_MODEL, D_FF, LAYERS, EXPERTS, GROUP = 256, 1024, 4, 8, 1024
BATCH, INPUTS, TARGETS, VOCAB = 32, 256, 64, 4196

MODELS = {
    "dense": "@transformer_layers.DenseReluDense",
    "switch": "@mtf_switch.layers.SwitchFFN",
    "moe1d": "@moe.MoE1D",
}


def _gin(ffn, dispatch):
  return [
      "import mesh_tensorflow.transformer.moe", "import mtf_switch.layers",
      "d_model = %d" % D_MODEL, "num_layers = %d" % LAYERS, "d_ff = %d" % D_FF,
      "num_heads = 4", "d_kv = 64",
      "encoder/transformer.make_layer_stack.layers = [@transformer_layers.SelfAttention, %s]"
      % ffn,
      "decoder/transformer.make_layer_stack.layers = [@transformer_layers.SelfAttention, "
      "@transformer_layers.EncDecAttention, %s]" % ffn,
      "SwitchFFN.num_experts = %d" % EXPERTS, "SwitchFFN.hidden_size = %d" % D_FF,
      "SwitchFFN.group_size = %d" % GROUP, "SwitchFFN.dispatch = %r" % dispatch,
      "MoE1D.moe_gating = 'switch'", "MoE1D.num_experts = %d" % EXPERTS,
      "MoE1D.hidden_size = %d" % D_FF, "MoE1D.group_size = %d" % GROUP,
      "MoE1D.activation = ['gelu', 'linear']",
      "MoE1D.switch_policy_train = 'input_jitter'", "MoE1D.switch_policy_eval = 'input_jitter'",
  ]


def build(name, dispatch, gin_params=()):
  """A session and a training op for model `name` (gin is parsed afresh for it)."""
  config.parse(["gin/models/t5_tiny.gin"], _gin(MODELS[name], dispatch) + list(gin_params))
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(0)
    mtf_graph = mtf.Graph()
    mesh = mtf.Mesh(mtf_graph, "mesh")
    model = transformer.make_bitransformer(input_vocab_size=VOCAB, output_vocab_size=VOCAB,
                                           layout="", mesh_shape="")
    batch = mtf.Dimension("batch", BATCH)
    rng = np.random.RandomState(0)

    def ids(length):
      return mtf.import_tf_tensor(
          mesh, tf.constant(rng.randint(2, VOCAB, size=[BATCH, length]), tf.int32),
          mtf.Shape([batch, mtf.Dimension("length", length)]))

    _, loss = model.call_simple(inputs=ids(INPUTS), targets=ids(TARGETS), compute_loss=True,
                                mode=tf.estimator.ModeKeys.TRAIN,
                                variable_dtype=mtf.VariableDType(tf.float32, tf.float32,
                                                                 tf.float32))
    variables = mtf_graph.trainable_variables
    grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
    updates = mtf.optimize.AdafactorOptimizer().apply_grads(grads, variables)
    lowering = mtf.Lowering(mtf_graph, {mesh: mtf.placement_mesh_impl.PlacementMeshImpl(
        "", "", [""])})
    train_op = tf.group([lowering.lowered_operation(op) for op in updates])
    tf_loss = lowering.export_to_tf_tensor(loss)
    init = [tf.global_variables_initializer(), lowering.copy_masters_to_slices()]
  session = tf.Session(graph=graph)
  session.run(init[0])
  session.run(init[1])
  for _ in range(3):
    session.run(train_op)
  return session, train_op, tf_loss


# Parts of a training step, by TensorFlow op name (the first that matches): (name, test).
CATEGORIES = [
    ("Adafactor, FFN variables (experts and router, or dense FFN)",
     lambda n: "adafactor" in n and any(k in n for k in ("MoE1D", "/moe", "DenseReluDense"))),
    ("Adafactor, other variables", lambda n: "adafactor" in n),
    ("Switch experts and dispatch (with gradients)",
     lambda n: any(k in n for k in ("/ragged_expert_ffn", "/switch_gather", "/switch_scatter",
                                    "MoE1D/wi", "MoE1D/wo", "MoE1D/einsum"))),
    ("Switch router, slots, losses (with gradients)", lambda n: "MoE1D" in n or "/moe" in n),
    ("dense FFN (with gradients)", lambda n: "DenseReluDense" in n),
    ("rest: attention, embeddings, norms, loss", lambda n: True),
]


def traced_nodes(session, fetch, runs):
  """TensorFlow's step stats (NodeExecStats) of every op run by `runs` traced runs of fetch."""
  options = tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE)
  for _ in range(runs):
    metadata = tf.RunMetadata()
    session.run(fetch, options=options, run_metadata=metadata)
    for device in metadata.step_stats.dev_stats:
      yield from device.node_stats


def profile(session, train_op, steps):
  """{category: ms of op time per step} over `steps` traced steps."""
  totals = collections.Counter()
  for node in traced_nodes(session, train_op, steps):
    name = next(c for c, test in CATEGORIES if test(node.node_name))
    totals[name] += (node.op_end_rel_micros - node.op_start_rel_micros) / 1e3 / steps
  return totals


def print_profiles(models, steps):
  profiles = {name: profile(session, train_op, steps)
              for name, (session, train_op, _) in models.items()}
  names = list(models)
  print("\n| part of the step: op time, ms per step (%d traced steps) | %s |%s" % (
      steps, " | ".join(names), "".join(" %s - dense |" % n for n in names if n != "dense")))
  print("|---" * (2 * len(names)) + "|")
  for category, _ in CATEGORIES + [("total", None)]:
    value = {n: sum(p.values()) if category == "total" else p[category]
             for n, p in profiles.items()}
    print("| %s | %s |%s" % (category, " | ".join("%.0f" % value[n] for n in names), "".join(
        " %+.0f |" % (value[n] - value["dense"]) for n in names if n != "dense")))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--dispatch", default="auto", help="SwitchFFN.dispatch")
  parser.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS))
  parser.add_argument("--gin_param", action="append", default=[],
                      help="extra gin binding for every model, e.g. SwitchFFN.group_size=512")
  parser.add_argument("--profile", type=int, default=0,
                      help="then trace this many steps per model and print where time goes")
  parser.add_argument("--rows", default="",
                      help="comma-separated experts.ROWS values: one switch model per value "
                           "(the ragged dispatch's row padding), timed in the same rounds")
  args = parser.parse_args()
  models, shipped = {}, experts.ROWS
  for name in args.models.split(","):
    for rows in (args.rows.split(",") if args.rows and name == "switch" else [""]):
      if rows:
        experts.ROWS = int(rows)  # read when the graph is built
      models[name + (" ROWS=" + rows if rows else "")] = build(name, args.dispatch,
                                                               args.gin_param)
  experts.ROWS = shipped
  times = {name: [] for name in models}
  for _ in range(args.rounds):
    for name, (session, train_op, _) in models.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        session.run(train_op)
      times[name].append((time.perf_counter() - start) / args.steps)
  step = {name: statistics.median(t) for name, t in times.items()}
  print("| model | s/step (median of %d rounds x %d steps) | relative to dense |"
        % (args.rounds, args.steps))
  print("|---|---|---|")
  for name in models:
    print("| %s | %.3f | %.2f |" % (name, step[name], step[name] / step["dense"]))
  print(json.dumps(dict({"%s_over_dense" % name: round(step[name] / step["dense"], 3)
                         for name in models if name != "dense"},
                        dispatch=args.dispatch, gin_param=args.gin_param)))
  if args.profile:
    print_profiles(models, args.profile)


if __name__ == "__main__":
  main()

"""Greedy decoding time per token of switch_tiny against its FLOP-matched dense twin t5_tiny, in
one process: the per-step cost of the Switch layers with the noise of trained models, exports
and separate processes left out (issue 18; decode_throughput.py measures the binary and the
SavedModel).

  python benchmarks/decode_step_time.py [--batches 1,16] [--rounds 10] [--calls 3] [--profile]

Both models are built from their gin files with initial weights (seed 0) and mtf_switch's
inference defaults (Switch layers dropless, the ragged dispatch on CPU), with
Unitransformer.sample_autoregressive.stop_at_token = None, so every call decodes exactly 32 tokens
for B fixed random prompts of 128 tokens (the encoder pass included, as in serving). Rounds
alternate the models (switch first in even rounds); the table gives the median over rounds of
the time per generated token and the ratio, of the medians and of the fastest rounds, and each
graph's node count. Pin it (`taskset -c 1`) to measure one thread. --profile: TensorFlow's step
stats of 3 more calls per model, the op types by summed run time per token and their count.
"""
import argparse
import collections
import os
import statistics
import time

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import numpy as np
import tensorflow.compat.v1 as tf

from layer_overhead import traced_nodes  # benchmarks/ is the script's folder
from mtf_switch import config

MODELS = ("switch_tiny", "t5_tiny")
VOCAB, INPUTS, DECODE_LENGTH = 4196, 128, 32
THREADS = len(os.sched_getaffinity(0))


class Decoder:
  """One model's greedy decoder for `batch` random prompts, in its own graph and session."""

  def __init__(self, model, batch):
    config.parse(["gin/models/%s.gin" % model],
                 ["Unitransformer.sample_autoregressive.stop_at_token = None"])
    graph = tf.Graph()
    with graph.as_default():
      tf.set_random_seed(0)
      mtf_graph = mtf.Graph()
      mesh = mtf.Mesh(mtf_graph, "mesh")
      bitransformer = transformer.make_bitransformer(
          input_vocab_size=VOCAB, output_vocab_size=VOCAB, layout="", mesh_shape="")
      prompts = np.random.RandomState(0).randint(2, VOCAB, size=[batch, INPUTS])
      inputs = mtf.import_tf_tensor(mesh, tf.constant(prompts, tf.int32), mtf.Shape(
          [mtf.Dimension("batch", batch), mtf.Dimension("length", INPUTS)]))
      decoded = bitransformer.decode(
          inputs, variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.float32),
          temperature=0.0, max_decode_length=DECODE_LENGTH)
      lowering = mtf.Lowering(mtf_graph, {mesh: mtf.placement_mesh_impl.PlacementMeshImpl(
          "", "", [""])})
      self.output = lowering.export_to_tf_tensor(decoded)
      init = [tf.global_variables_initializer(), lowering.copy_masters_to_slices()]
      self.nodes = len(graph.as_graph_def().node)
    self.session = tf.Session(graph=graph, config=tf.ConfigProto(
        intra_op_parallelism_threads=THREADS, inter_op_parallelism_threads=THREADS))
    for op in init:
      self.session.run(op)
    self.session.run(self.output)  # warm-up

  def ms_per_token(self, calls):
    start = time.perf_counter()
    for _ in range(calls):
      self.session.run(self.output)
    return (time.perf_counter() - start) / calls / DECODE_LENGTH * 1e3

  def profile(self, calls=3):
    """{op type: (microseconds per token, ops per token)} from TensorFlow's step stats."""
    micros, counts = collections.Counter(), collections.Counter()
    for node in traced_nodes(self.session, self.output, calls):
      label = node.timeline_label
      op = label.split("=")[-1].split("(")[0].strip() if "=" in label else node.node_name
      micros[op] += node.all_end_rel_micros
      counts[op] += 1
    per_token = calls * DECODE_LENGTH
    return {op: (micros[op] / per_token, counts[op] / per_token) for op in micros}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--calls", type=int, default=3, help="decodes per model and round")
  parser.add_argument("--profile", action="store_true")
  args = parser.parse_args()
  print("threads: %d, load %.2f" % (THREADS, os.getloadavg()[0]))
  print("| batch | switch_tiny ms/token | t5_tiny ms/token | switch / dense (medians) | "
        "switch / dense (fastest rounds) | graph nodes switch, dense |")
  print("|---|---|---|---|---|---|")
  for batch in (int(b) for b in args.batches.split(",")):
    decoders = {m: Decoder(m, batch) for m in MODELS}
    times = collections.defaultdict(list)
    for r in range(args.rounds):
      for model in MODELS if r % 2 == 0 else MODELS[::-1]:
        times[model].append(decoders[model].ms_per_token(args.calls))
    median = {m: statistics.median(t) for m, t in times.items()}
    print("| %d | %.3f | %.3f | %.3f | %.3f | %d, %d |" % (
        batch, median["switch_tiny"], median["t5_tiny"], median["switch_tiny"] / median["t5_tiny"],
        min(times["switch_tiny"]) / min(times["t5_tiny"]), decoders["switch_tiny"].nodes,
        decoders["t5_tiny"].nodes), flush=True)
    if args.profile:
      profiles = {m: d.profile() for m, d in decoders.items()}
      for model, ops in profiles.items():
        print("batch %d, %s: %.0f us of op time and %.0f ops per token; top op types:" % (
            batch, model, sum(t for t, _ in ops.values()), sum(n for _, n in ops.values())))
        for op, (t, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]:
          print("  %-24s %8.1f us %7.1f ops" % (op, t, n))
  print("load %.2f" % os.getloadavg()[0])


if __name__ == "__main__":
  main()

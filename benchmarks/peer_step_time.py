"""mtf_switch against Hugging Face SwitchTransformers (eager PyTorch) at the same architecture,
parameters and initial weights, on this machine's CPU, in one process (issue 22).

  python benchmarks/peer_step_time.py [--rounds 3] [--steps 3] [--decode_batches 1,16]
      [--what train,forward,decode]

Configuration: gin/models/switch_tiny_classic.gin (original T5: ReLU FFNs, tied embeddings,
8 experts at every other FFN - HF's sparse layers i % 2 == 1) at d_model 256, d_ff 1024,
4+4 layers, 4 heads of d_kv 64, dropout 0, float32; 32 sequences of inputs 256 / targets 64
(fixed random ids, so only the model is timed); the default corpus' vocabulary size 4196, which
mtf pads to 4224 (Unitransformer.vocab_divisor 128): HF gets 4224 rows. HF's config is
export_hf.hf_config of the built mtf model, and its weights are mtf's initial ones
(export_hf.hf_state), so both sides hold the same tensors: the parameter counts printed
(mtf: trainable variable sizes; HF: unique parameters) are equal (23,115,520), or the script
stops. Both tie the input embeddings and softmax weights (hf_config's tie_word_embeddings is
mtf's shared_embedding_and_softmax_weights); untied, transformers 5 would add per-stack
embed_tokens beside shared.weight, 2 x 4224 x 256 parameters more than mtf's untied model.

Routing. mtf routes groups of SwitchFFN.group_size tokens with C = int(S * cf / E); here
S = 256 (one encoder sequence, four decoder ones) and cf 1.25 in training and in the
teacher-forced forward (capacity_factor_eval bound to 1.25): C = 40. HF routes each sequence
with one fixed expert_capacity for both stacks, in training and inference: 40 =
int(256 * 1.25 / 8) (hf_config's default for 256-token sequences), so the encoders route alike
(token order decides who is dropped on both sides); mtf's decoder keeps 40 tokens per expert of
256 (4 sequences), HF's 40 of 64 (one sequence), almost never dropping. Decoding: mtf is dropless
(SwitchFFN.dropless_predict, its default), HF's encoder keeps at most 40 tokens per expert and
sequence; each decoding step routes one token per sequence on both sides, never dropped. Both
compute only routed tokens (mtf's ragged dispatch on CPU, HF's loop over experts). Input jitter
(training only) is HF's router_jitter_noise (1e-2, hf_config maps it). Losses: mtf adds a
balance loss per Switch layer and its logits z-loss (1e-4), HF (output_router_logits=True) one
balance loss per stack and a router z-loss times router_z_loss_coef 0; the forward losses
printed at the initial weights differ by these terms, about 0.02.

Adafactor: mtf.optimize.AdafactorOptimizer() against transformers.optimization.Adafactor(
scale_parameter=True, relative_step=True, warmup_init=False, lr=None): both step size
min(1e-2, 1/sqrt(step)) times max(1e-3, RMS(parameter)), second-moment decay 1 - step^-0.8,
update clipping 1.0, no first moment, epsilon 1e-30. Factored second moments: mtf factors
tensors whose two largest dimensions are both >= 128 (an expert tensor per expert), HF every
matrix (also the router kernels and relative attention biases, which mtf keeps whole). The mtf
step increments the global step, as the binary's does.

Threads: TF's session and torch get the same count, this process' CPUs (2 here): TF intra- and
inter-op pools of that size (TF's defaults on this machine), torch.set_num_threads and
set_num_interop_threads.

Timed, after one warm-up of each (two training steps), in --rounds rounds, each running every
measurement --steps times on both sides in turn (mtf first in even rounds, HF first in odd
ones); the table gives the median over rounds of the mean time per call:
  train: forward + backward + Adafactor update of a batch (mtf: one session.run; HF:
    model.train(), loss.backward(), optimizer.step(), zero_grad);
  forward: the teacher-forced loss of the same batch without gradients (mtf: an EVAL-mode
    loss in the same graph and session; HF: model.eval() under torch.no_grad());
  decode_bB: greedy decoding of exactly 32 tokens for the first B input sequences (256
    tokens each), encoder included, per generated token (mtf: Bitransformer.decode with
    temperature 0, max_decode_length 32 and Unitransformer.sample_autoregressive.
    stop_at_token = None, so all 32 steps run; HF: generate(max_new_tokens=32,
    min_new_tokens=32, do_sample=False, num_beams=1)).
Prints a markdown table (measurement, mtf s, HF s, HF/mtf) and a JSON line with the ratios,
both parameter counts and the 1-minute load average before and after the timed rounds (eager
PyTorch suffers far more than TF from other processes on the cores: run on a quiet machine).
"""
import argparse
import json
import os
import statistics
import time

import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
import numpy as np
import tensorflow.compat.v1 as tf
import torch
import transformers

from mtf_switch import config
from mtf_switch import convert_hf
from mtf_switch import export_hf

D_MODEL, D_FF, LAYERS, EXPERTS, HEADS, D_KV = 256, 1024, 4, 8, 4, 64
BATCH, INPUTS, TARGETS, VOCAB = 32, 256, 64, 4196
CAPACITY_FACTOR, DECODE_LENGTH = 1.25, 32
THREADS = len(os.sched_getaffinity(0))
GIN = [
    "d_model = %d" % D_MODEL, "num_layers = %d" % LAYERS, "num_blocks = %d" % (LAYERS // 2),
    "d_ff = %d" % D_FF, "num_heads = %d" % HEADS, "d_kv = %d" % D_KV, "dropout_rate = 0.0",
    "SwitchFFN.num_experts = %d" % EXPERTS, "SwitchFFN.group_size = %d" % INPUTS,
    "SwitchFFN.capacity_factor_train = %r" % CAPACITY_FACTOR,
    "SwitchFFN.capacity_factor_eval = %r" % CAPACITY_FACTOR,
    "Unitransformer.sample_autoregressive.stop_at_token = None",
]
VARIABLE_DTYPE = mtf.VariableDType(tf.float32, tf.float32, tf.float32)


def random_ids(batch, seed=0):
  """Fixed random ids (no padding, no EOS): inputs [batch, INPUTS], targets [batch, TARGETS]."""
  rng = np.random.RandomState(seed)
  return (rng.randint(2, VOCAB, size=[batch, INPUTS]).astype(np.int32),
          rng.randint(2, VOCAB, size=[batch, TARGETS]).astype(np.int32))


class Mtf:
  """The mtf model: training op, EVAL-mode loss and decoders, in one graph and session."""

  def __init__(self, inputs, targets, batch_size, decode_batches):
    config.parse(["gin/models/switch_tiny_classic.gin"], GIN)
    graph = tf.Graph()
    with graph.as_default():
      tf.set_random_seed(0)
      mtf_graph = mtf.Graph()
      mesh = mtf.Mesh(mtf_graph, "mesh")
      self.model = transformer.make_bitransformer(input_vocab_size=VOCAB,
                                                  output_vocab_size=VOCAB,
                                                  layout="", mesh_shape="")
      batch = mtf.Dimension("batch", batch_size)

      def ids(array, batch_dim=batch):
        return mtf.import_tf_tensor(
            mesh, tf.constant(array), mtf.Shape([batch_dim,
                                                 mtf.Dimension("length", array.shape[1])]))

      def loss(mode):
        return self.model.call_simple(inputs=ids(inputs[:batch_size]),
                                      targets=ids(targets[:batch_size]),
                                      compute_loss=True, mode=mode,
                                      variable_dtype=VARIABLE_DTYPE)[1]

      train_loss = loss(tf.estimator.ModeKeys.TRAIN)
      self.variables = mtf_graph.trainable_variables
      grads = mtf.gradients([train_loss], [v.outputs[0] for v in self.variables])
      updates = mtf.optimize.AdafactorOptimizer().apply_grads(grads, self.variables)
      eval_loss = loss(tf.estimator.ModeKeys.EVAL)
      decodes = {b: self.model.decode(ids(inputs[:b], mtf.Dimension("batch", b)),
                                      variable_dtype=VARIABLE_DTYPE, temperature=0.0,
                                      max_decode_length=DECODE_LENGTH)
                 for b in decode_batches}
      lowering = mtf.Lowering(mtf_graph, {mesh: mtf.placement_mesh_impl.PlacementMeshImpl(
          "", "", [""])})
      step = tf.train.get_or_create_global_step()
      self.ops = {"train": tf.group([lowering.lowered_operation(op) for op in updates] +
                                    [step.assign_add(1)]),
                  "forward": lowering.export_to_tf_tensor(eval_loss)}
      self.ops.update(("decode_b%d" % b, lowering.export_to_tf_tensor(d))
                      for b, d in decodes.items())
      self.masters = {v.name: v.get_master() for v in self.variables}
      init = [tf.global_variables_initializer(), lowering.copy_masters_to_slices()]
    self.session = tf.Session(graph=graph, config=tf.ConfigProto(
        intra_op_parallelism_threads=THREADS, inter_op_parallelism_threads=THREADS))
    self.session.run(init[0])
    self.session.run(init[1])

  def num_parameters(self):
    return sum(v.shape.size for v in self.variables)

  def values(self):
    return self.session.run(self.masters)

  def run(self, what):
    return self.session.run(self.ops[what])


class Hf:
  """SwitchTransformersForConditionalGeneration with the mtf model's config and weights."""

  def __init__(self, mtf_model, values, inputs, targets, batch_size):
    # capacity_factor_eval (= the training one here) for one sequence of INPUTS tokens: 40
    hf_config, shared_inputs = export_hf.hf_config(mtf_model, sequence_length=INPUTS)
    state = export_hf.hf_state(convert_hf.variable_map(hf_config, shared_inputs), set(values),
                               values.get)
    self.model = export_hf._hf_model(hf_config, state)  # pylint: disable=protected-access
    self.optimizer = transformers.optimization.Adafactor(
        self.model.parameters(), scale_parameter=True, relative_step=True, warmup_init=False,
        lr=None)
    self.inputs = torch.from_numpy(inputs).long()
    self.targets = torch.from_numpy(targets).long()
    self.batch_size = batch_size

  def num_parameters(self):
    return sum(p.numel() for p in self.model.parameters())  # tied tensors once

  def _loss(self):
    return self.model(input_ids=self.inputs[:self.batch_size],
                      labels=self.targets[:self.batch_size], output_router_logits=True).loss

  def run(self, what):
    if what == "train":
      self.model.train()
      self._loss().backward()
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
      return None
    self.model.eval()
    with torch.no_grad():
      if what == "forward":
        return self._loss().item()
      batch = int(what[len("decode_b"):])
      out = self.model.generate(input_ids=self.inputs[:batch], max_new_tokens=DECODE_LENGTH,
                                min_new_tokens=DECODE_LENGTH, do_sample=False, num_beams=1)
      return out[:, 1:].numpy()  # after the start id 0


def seconds_per_call(side, what, steps):
  start = time.perf_counter()
  for _ in range(steps):
    side.run(what)
  return (time.perf_counter() - start) / steps


def check_parameters(mtf_side, hf_side):
  counts = {"mtf_params": mtf_side.num_parameters(), "hf_params": hf_side.num_parameters()}
  print("parameters: mtf %(mtf_params)d, HF %(hf_params)d" % counts)
  if counts["mtf_params"] != counts["hf_params"]:
    raise SystemExit("parameter counts differ: the architectures are not the same")
  return counts


def check_warm_up(mtf_side, hf_side, measurements):
  """One call of each measurement on both sides (two training steps, last: the forward and
  decodes compared here see the same weights on both sides); prints the forward losses and how
  often the greedy tokens agree, and checks that both decoders produce DECODE_LENGTH tokens."""
  for what in sorted(measurements, key=lambda m: m == "train"):
    results = {}
    for name, side in (("mtf", mtf_side), ("HF", hf_side)):
      for _ in range(2 if what == "train" else 1):
        results[name] = side.run(what)
    if what == "forward":
      print("forward loss at the initial weights: mtf %.4f, HF %.4f" % (results["mtf"],
                                                                        results["HF"]))
    elif what.startswith("decode"):
      shapes = {name: np.shape(r) for name, r in results.items()}
      if len(set(shapes.values())) != 1 or shapes["mtf"][1] != DECODE_LENGTH:
        raise SystemExit("%s: decoded shapes %s, expected [B, %d]" % (what, shapes,
                                                                     DECODE_LENGTH))
      print("%s: greedy tokens equal on %.0f%% of positions" % (
          what, 100 * np.mean(results["mtf"] == results["HF"])))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3, help="calls of each measurement a round")
  parser.add_argument("--decode_batches", default="1,16")
  parser.add_argument("--what", default="train,forward,decode",
                      help="subset of train,forward,decode")
  parser.add_argument("--batch", type=int, default=BATCH,
                      help="training and forward batch (smaller only for smoke tests)")
  args = parser.parse_args()
  torch.set_num_threads(THREADS)
  torch.set_num_interop_threads(THREADS)
  decode_batches = [int(b) for b in args.decode_batches.split(",")]
  what = args.what.split(",")
  measurements = [w for w in ("train", "forward") if w in what] + (
      ["decode_b%d" % b for b in decode_batches] if "decode" in what else [])
  inputs, targets = random_ids(max([args.batch] + decode_batches))
  mtf_side = Mtf(inputs, targets, args.batch, decode_batches if "decode" in what else [])
  hf_side = Hf(mtf_side.model, mtf_side.values(), inputs, targets, args.batch)
  counts = check_parameters(mtf_side, hf_side)
  check_warm_up(mtf_side, hf_side, measurements)
  times = {(name, m): [] for name in ("mtf", "hf") for m in measurements}
  load = [round(os.getloadavg()[0], 2)]
  for r in range(args.rounds):
    sides = [("mtf", mtf_side), ("hf", hf_side)][::1 if r % 2 == 0 else -1]
    for m in measurements:
      for name, side in sides:
        times[name, m].append(seconds_per_call(side, m, args.steps))
  load.append(round(os.getloadavg()[0], 2))
  median = {key: statistics.median(t) / (DECODE_LENGTH if key[1].startswith("decode") else 1)
            for key, t in times.items()}
  print("| measurement (median of %d rounds x %d calls) | mtf s | HF s | HF / mtf |"
        % (args.rounds, args.steps))
  print("|---|---|---|---|")
  ratios = {}
  for m in measurements:
    ratios[m + "_hf_over_mtf"] = round(median["hf", m] / median["mtf", m], 3)
    label = {"train": "train step, batch %d" % args.batch,
             "forward": "teacher-forced forward, batch %d" % args.batch}.get(
                 m, "greedy decode, batch %s, per token" % m[len("decode_b"):])
    print("| %s | %.4f | %.4f | %.2f |" % (label, median["mtf", m], median["hf", m],
                                           ratios[m + "_hf_over_mtf"]))
  print(json.dumps(dict(ratios, threads=THREADS, batch=args.batch, load_1min=load, **counts)))


if __name__ == "__main__":
  main()

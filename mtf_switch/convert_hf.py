"""Imports Hugging Face SwitchTransformers checkpoints (google/switch-base-8, ...) as Mesh
TensorFlow checkpoints that score identically.

  python -m mtf_switch.convert_hf --hf_dir DIR --model_dir OUT [--vocabulary t5]

writes OUT/model.ckpt-0 (+ OUT/checkpoint) and OUT/operative_config.gin, the model for
`t5_mesh_transformer --module_import=mtf_switch --use_model_api --model_dir=OUT` in every mode
(score, predict, eval, export_*; finetune with `--pretrained_model_dir=OUT`). Options:
  --hf_dir: a local directory holding a `SwitchTransformersForConditionalGeneration`
    (`save_pretrained` or a downloaded model repository): config.json and model*.safetensors,
    or pytorch_model*.bin (any dtype; sharded or not), read lazily. Needs `transformers` (a
    dependency of t5) and torch.
  --model_dir: where the Mesh TensorFlow model goes.
  --vocabulary: the vocabulary the model is used with, as mesh-tensorflow takes it: the seqio
    task or mixture whose vocabulary `--mode=score/predict` use (the gin macro MIXTURE_NAME).
    "t5" (default; T5's SentencePiece model gs://t5-data/vocabs/cc_all.32000/sentencepiece.model
    with 100 extra ids, that of the released Switch checkpoints; task c4_v220_span_corruption),
    "mtf_switch" (the default corpus vocabulary of mtf_switch.tasks, task
    mtf_switch_span_corruption) or any registered task or mixture name. A vocabulary with more
    ids than the checkpoint has embeddings is an error (not checked for remote files).

Mapping (HF tensor -> mtf variable; HF Linear weights are [out, in], mtf kernels [in, out], so
matrices are transposed):
  shared.weight -> shared/embedding (encoder and decoder inputs; also the softmax weights when
    tie_word_embeddings; {encoder,decoder}.embed_tokens.weight and a tied lm_head.weight, where
    present, must equal it); an untied lm_head.weight -> decoder/logits/kernel. Untied models
    saved by transformers 5 embed each stack with its own {stack}.embed_tokens.weight ->
    {stack}/embedding (Bitransformer.shared_embedding = False; shared.weight is unused there).
  {stack}.block.i.layer.j.{SelfAttention,EncDecAttention}.{q,k,v,o}.weight ->
    {stack}/block_b/layer_l/{SelfAttention,EncDecAttention}/{q,k,v,o}; the first layer's
    relative_attention_bias.weight [buckets, heads] -> .../SelfAttention/relative_attention_bias
    [heads, buckets], shared by the stack's layers (relative_attention_type "bias_shared").
  ...layer_norm.weight -> .../rms_norm/scale, {stack}.final_layer_norm.weight ->
    {stack}/rms_norm/scale (T5's RMS norm; epsilon = layer_norm_epsilon).
  dense ...mlp.{wi,wo}.weight -> .../DenseReluDense/{wi,wo}/kernel; sparse
    ...mlp.router.classifier.weight -> .../MoE1D/switch_gating/kernel [d_model, E] and
    ...mlp.experts.expert_e.{wi,wo}.weight -> .../MoE1D/{wi,wo}/kernel [E, d_model, d_ff] /
    [E, d_ff, d_model].
HF's layer i of a stack (sparse iff i % sparse_step == 1, or every layer if sparse_step == 1)
holds self-attention, (encoder-decoder attention,) FFN; the operative config lists these
sublayers for the smallest period of the dense/sparse pattern (`make_layer_stack.layers`) and
repeats it (`num_layers`), so HF's every-other-layer models (the released ones) get the names
of gin/models/switch_base_classic.gin. Weights are stored in float32
(get_variable_dtype.master_dtype), whatever their dtype in the HF checkpoint. Neither side
scales attention logits at run time (HF's scaling = 1.0; mesh-tensorflow folds 1/sqrt(d_kv)
into the query initializer), and both scale the decoder output by d_model**-0.5 before tied
softmax weights (HF's tie_word_embeddings, mtf's shared_embedding_and_softmax_weights).

Config: d_model, d_kv, d_ff, num_heads, num_layers, num_decoder_layers, num_experts,
vocab_size, relative_attention_num_buckets, layer_norm_epsilon, dropout_rate (all dropouts,
inside the experts too), tie_word_embeddings and the sparse layers map one to one;
dense_act_fn "relu" (the released checkpoints), "gelu_new" or "gelu_pytorch_tanh" (mtf's
tanh-approximated "gelu"). Training-only fields become their SwitchFFN counterparts:
router_jitter_noise -> jitter_eps (router_policy "input_jitter", "argmax" if 0),
router_aux_loss_coef -> loss_coef, router_z_loss_coef -> router_z_loss_coef. Ignored:
initializer_factor, router_ignore_padding_tokens (HF's forward does not read it), use_cache,
add_router_probs, output_router_logits and the other generic fields. Unsupported, an error
that lists all offenders: router_bias, a router_dtype other than float32 (mtf_switch routes in
float32), relative_attention_max_distance != 128 (fixed in mesh-tensorflow), pad/decoder-start
id != 0, EOS id != 1, other activations, expert_capacity < 1. Every HF tensor must be mapped
and every mapped one present; otherwise the error lists them.

Vocabulary padding: mesh-tensorflow pads the vocabulary to a multiple of
Unitransformer.vocab_divisor and takes the softmax over all of it (the padded rows are not
masked). The operative config sets vocab_divisor = the checkpoint's vocab_size, so the mtf
vocabulary is exactly HF's rows (e.g. T5's 32100 ids -> 32128, as HF), and the softmax runs over
the same ids with the same weights as in HF.

Capacity and routing groups: HF routes each sequence separately, top-1 in token order (a
token is dropped, i.e. only the residual carries it, when `expert_capacity` earlier tokens of
its sequence already went to its expert), with a fixed capacity per sequence. The converted
model uses `PerSequenceSwitchFFN` (below): SwitchFFN with one routing group per sequence (per
row of the batch), whatever the sequence length, and one token per group when decoding step
by step (as HF's cached decoding, where a token is never dropped), with
capacity_factor_train/_eval = 0 and min_capacity = expert_capacity, so that
C = max(min(S, int(S * cf / E)), min_capacity) = expert_capacity, in training as in inference
(the operative config sets SwitchFFN.dropless_predict = False: HF drops at inference too).
Scores do not depend on the batch size then. Remaining differences:
  - Padding: mtf_switch never routes padding tokens; HF routes them and lets them take
    capacity. With right padding (HF's tokenizers, the t5 binary) they come after every real
    token of their sequence and change nothing; with left padding in HF they would.
  - Packed rows (mtf training with packing): a group is a row of the batch, which can hold
    several examples; HF has one example per row.
  - Training losses: HF adds one balance loss c * E^2 * mean_e(f_e P_e) (and one z-loss) per
    stack over all its sparse layers' tokens, padding included, and only when it is asked for
    router logits; mtf_switch adds c_B * L_B (+ c_z * L_z) per layer over real tokens. The
    coefficients carry over unchanged. mesh-tensorflow also adds its logits z-loss (1e-4,
    Unitransformer.z_loss) in training; HF does not.
  - Fine-tuning recipes override the capacity: gin/runs/finetune.gin's capacity factors 1.25 /
    2.0 give C = max(min(S, int(S * cf / E)), expert_capacity).
  - Cost: C can exceed a sequence's share of tokens (released checkpoints: expert_capacity 64,
    so 128 experts x 64 slots for a 512-token sequence). The einsum and gather dispatches (TPU,
    expert parallelism) compute every slot; the ragged one (CPU/GPU default) only kept tokens.
    Lower SwitchFFN.min_capacity (and raise the capacity factors) to trade exactness for speed.
  - Command-line --gin_param bindings do not override the operative config in --mode=score,
    predict, eval or export (upstream t5 parses it last); edit OUT/operative_config.gin to
    change e.g. SwitchFFN.min_capacity for those modes.
"""
import argparse
import copy
import functools
import glob
import os

import gin
import numpy as np
import tensorflow.compat.v1 as tf

from mtf_switch import layers

VOCABULARIES = {"t5": "c4_v220_span_corruption", "mtf_switch": "mtf_switch_span_corruption"}
ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_CHUNK_BYTES = 1 << 30  # checkpoint data written per SaveV2 call

# (field, supported value(s), why): config values the converter cannot reproduce.
_REQUIRED = (
    ("is_encoder_decoder", (True,), "an encoder-decoder model"),
    ("router_bias", (False,), "mtf_switch routers have no bias"),
    ("router_dtype", ("float32",), "mtf_switch routes in float32"),
    ("relative_attention_max_distance", (128,), "fixed in mesh-tensorflow"),
    ("pad_token_id", (0,), "mesh-tensorflow pads with 0"),
    ("decoder_start_token_id", (0, None), "mesh-tensorflow starts decoding with 0"),
    ("eos_token_id", (1, [1], None), "mesh-tensorflow's EOS is 1"),
    ("dense_act_fn", tuple(ACTIVATIONS), "activations mesh-tensorflow computes identically"),
)


@gin.configurable
class PerSequenceSwitchFFN(layers.SwitchFFN):
  """SwitchFFN with one routing group per sequence (each row of the batch), whatever the
  sequence length, and one token per group when decoding step by step: the routing of Hugging
  Face's SwitchTransformers. Takes SwitchFFN's gin parameters (`SwitchFFN.*`); group_size is
  ignored. Its variables are a SwitchFFN's (`<layer>/MoE1D/...`)."""

  def call(self, context, x):
    layer = copy.copy(self)
    layer.group_size = context.length_dim.size if context.length_dim in x.shape.dims else 1
    return super(PerSequenceSwitchFFN, layer).call(context, x)


def sparse_layers(num_layers, sparse_step):
  """Which of a stack's layers HF makes sparse (SwitchTransformersStack)."""
  return [sparse_step > 0 and (i % sparse_step == 1 or sparse_step == 1)
          for i in range(num_layers)]


def _period(pattern):
  """The smallest p dividing len(pattern) with pattern[i] == pattern[i % p]."""
  n = len(pattern)
  return next(p for p in range(1, n + 1)
              if n % p == 0 and all(s == pattern[i % p] for i, s in enumerate(pattern)))


def _stacks(config):
  """Per stack: its name, whether each HF layer is sparse, the period of that pattern (HF
  layers per mtf block) and the attention sublayers of a layer."""
  for stack, num_layers, step in (
      ("encoder", config.num_layers, config.encoder_sparse_step),
      ("decoder", config.num_decoder_layers, config.decoder_sparse_step)):
    sparse = sparse_layers(num_layers, step)
    yield (stack, sparse, _period(sparse),
           ["SelfAttention", "EncDecAttention"][:1 + (stack == "decoder")])


def _transposed(arrays):
  return np.ascontiguousarray(arrays[0].T)


def _same(arrays):
  return arrays[0]


def _stacked_transposed(arrays):
  return np.stack([a.T for a in arrays])


# The inverse of each of those: an mtf variable's value -> its HF tensors (mtf_switch.export_hf).
_TO_HF = {_transposed: lambda value: [value.T], _same: lambda value: [value],
          _stacked_transposed: lambda value: [e.T for e in value]}


def to_hf(fn, value):
  """The HF arrays of which fn (a variable_map function) gives value."""
  return _TO_HF[fn](value)


def variable_map(config, shared_inputs=True):
  """{mtf variable: (HF tensor names, function of their arrays giving its value)}.

  shared_inputs: whether the encoder and decoder embed their inputs with shared.weight (else
    each with its own embed_tokens, as transformers 5 does when the embeddings are untied)."""
  if shared_inputs:
    plan = {"shared/embedding": (["shared.weight"], _same)}
  else:
    plan = {stack + "/embedding": ([stack + ".embed_tokens.weight"], _same)
            for stack in ("encoder", "decoder")}
  if not config.tie_word_embeddings:
    plan["decoder/logits/kernel"] = (["lm_head.weight"], _transposed)
  for stack, sparse, period, attentions in _stacks(config):
    per_layer = len(attentions) + 1  # sublayers of an HF layer
    for i, is_sparse in enumerate(sparse):
      def mtf(j, name, i=i):
        return "%s/block_%03d/layer_%03d/%s" % (stack, i // period, i % period * per_layer + j,
                                                name)
      hf = "%s.block.%d.layer." % (stack, i)
      for j, attention in enumerate(attentions):
        for w in "qkvo":
          plan[mtf(j, attention + "/" + w)] = (["%s%d.%s.%s.weight" % (hf, j, attention, w)],
                                               _transposed)
        plan[mtf(j, "rms_norm/scale")] = (["%s%d.layer_norm.weight" % (hf, j)], _same)
      if i == 0:
        plan[mtf(0, "SelfAttention/relative_attention_bias")] = (
            [hf + "0.SelfAttention.relative_attention_bias.weight"], _transposed)
      j = per_layer - 1
      ffn = "%s%d." % (hf, j)
      plan[mtf(j, "rms_norm/scale")] = ([ffn + "layer_norm.weight"], _same)
      if is_sparse:
        plan[mtf(j, "MoE1D/switch_gating/kernel")] = ([ffn + "mlp.router.classifier.weight"],
                                                      _transposed)
        for w in ("wi", "wo"):
          plan[mtf(j, "MoE1D/%s/kernel" % w)] = (
              ["%smlp.experts.expert_%d.%s.weight" % (ffn, e, w)
               for e in range(config.num_experts)], _stacked_transposed)
      else:
        for w in ("wi", "wo"):
          plan[mtf(j, "DenseReluDense/%s/kernel" % w)] = (["%smlp.%s.weight" % (ffn, w)],
                                                         _transposed)
    plan[stack + "/rms_norm/scale"] = ([stack + ".final_layer_norm.weight"], _same)
  return plan


def check_config(config):
  """Raises ValueError listing every config value the converter does not support."""
  problems = ["%s=%r (supported: %s; %s)" % (field, getattr(config, field, None),
                                             " or ".join(map(repr, values)), why)
              for field, values, why in _REQUIRED
              if getattr(config, field, None) not in values]
  if config.expert_capacity < 1:
    problems.append("expert_capacity=%r (must be >= 1)" % config.expert_capacity)
  if problems:
    raise ValueError("Unsupported SwitchTransformers config values:\n  " +
                     "\n  ".join(problems))


def _numpy(get_tensor, name):
  return get_tensor(name).float().numpy()


def _hf_tensors(hf_dir):
  """{name: function returning the tensor as float32 numpy}, read lazily (memory-mapped)."""
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {}
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if files:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    for path in files:
      f = safe_open(path, "pt")
      tensors.update((name, functools.partial(_numpy, f.get_tensor, name)) for name in f.keys())
  else:
    files = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
    for path in files:
      state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
      tensors.update((name, functools.partial(_numpy, state.get, name)) for name in state)
  if not files:
    raise FileNotFoundError("%s holds no model*.safetensors or pytorch_model*.bin" % hf_dir)
  return tensors


def _check_vocabulary(mixture_or_task, vocab_size):
  """Raises ValueError unless the task or mixture exists and its (local) vocabularies fit in
  the checkpoint's vocab_size rows."""
  import seqio  # pylint: disable=g-import-not-at-top
  import mtf_switch.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers tasks)
  try:
    features = seqio.get_mixture_or_task(mixture_or_task).output_features
  except ValueError as e:
    raise ValueError("--vocabulary: %r is neither t5, mtf_switch nor a registered task or "
                     "mixture" % mixture_or_task) from e
  for feature in [name for name in ("inputs", "targets") if name in features]:
    vocabulary = features[feature].vocabulary
    if "://" in (getattr(vocabulary, "sentencepiece_model_file", None) or ""):
      continue  # a remote file: not read at conversion time
    if vocabulary.vocab_size > vocab_size:
      raise ValueError("The %s vocabulary of %s has %d ids, more than the checkpoint's "
                       "vocab_size %d." % (feature, mixture_or_task, vocabulary.vocab_size,
                                           vocab_size))


def _write_checkpoint(prefix, variables):
  """Writes a TF checkpoint `prefix` of {name: function returning its array}, reading and
  writing at most _CHUNK_BYTES of values at a time."""
  parts, chunk, size = [], {}, 0

  def save():  # into prefix_parts/, which the merge deletes
    parts.append(os.path.join(prefix + "_parts", "part-%05d" % len(parts)))
    with tf.Graph().as_default():
      holders = [tf.placeholder(tf.as_dtype(a.dtype), a.shape) for a in chunk.values()]
      op = tf.raw_ops.SaveV2(prefix=parts[-1], tensor_names=list(chunk),
                             shape_and_slices=[""] * len(chunk), tensors=holders)
      with tf.Session() as sess:
        sess.run(op, dict(zip(holders, chunk.values())))

  for name, value in sorted(variables.items()):
    chunk[name] = value()
    size += chunk[name].nbytes
    if size >= _CHUNK_BYTES:
      save()
      chunk, size = {}, 0
  if chunk:
    save()
  with tf.Graph().as_default(), tf.Session() as sess:
    sess.run(tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefix,
                                           delete_old_dirs=True))


def operative_config(config, mixture_or_task, shared_inputs=True, hf_dir=""):
  """The gin text of the converted model (OUT/operative_config.gin)."""
  activation = ACTIVATIONS[config.dense_act_fn]
  lines = [
      "# -*-Python-*-",
      "# Hugging Face SwitchTransformers %s, converted by mtf_switch.convert_hf." % hf_dir,
      "import mesh_tensorflow.transformer.transformer_layers",
      "import mtf_switch.convert_hf",
      "import mtf_switch.tasks",
      "import t5.models.mesh_transformer",
      "",
      "MIXTURE_NAME = %r  # its vocabulary is the model's" % mixture_or_task,
      "get_vocabulary.mixture_or_task_name = %MIXTURE_NAME",
      "d_model = %d" % config.d_model,
      "d_ff = %d" % config.d_ff,
      "d_kv = %d" % config.d_kv,
      "num_heads = %d" % config.num_heads,
      "dropout_rate = %r" % float(config.dropout_rate),
      "",
      "utils.get_variable_dtype.master_dtype = 'float32'",
      "Bitransformer.shared_embedding = %r" % shared_inputs,
      "Unitransformer.d_model = %d_model",
      "Unitransformer.positional_embedding = False",
      "Unitransformer.shared_embedding_and_softmax_weights = %r" % config.tie_word_embeddings,
      "# The vocabulary is padded to a multiple of this: exactly the checkpoint's rows.",
      "Unitransformer.vocab_divisor = %d" % config.vocab_size,
      "LayerStack.sublayers_initial = [@transformer.sublayer_dropout]",
      "LayerStack.sublayers_per_layer = [@transformer.sublayer_rms_norm, "
      "@transformer.sublayer_call_layer, @transformer.sublayer_dropout, "
      "@transformer.sublayer_residual]",
      "LayerStack.sublayers_final = [@transformer.sublayer_rms_norm, "
      "@transformer.sublayer_dropout]",
      "sublayer_rms_norm.epsilon = %r" % config.layer_norm_epsilon,
      "sublayer_dropout.dropout_rate = %dropout_rate",
      "SelfAttention.num_heads = %num_heads",
      "SelfAttention.key_value_size = %d_kv",
      "SelfAttention.dropout_rate = %dropout_rate",
      "SelfAttention.relative_attention_type = 'bias_shared'",
      "SelfAttention.relative_attention_num_buckets = %d" % config.relative_attention_num_buckets,
      "EncDecAttention.relative_attention_type = None",
      "DenseReluDense.hidden_size = %d_ff",
      "DenseReluDense.activation = %r" % activation,
      "DenseReluDense.dropout_rate = %dropout_rate",
      "DenseReluDense.use_bias = False",
      "",
      "# HF's routing: a group per sequence (PerSequenceSwitchFFN), capacity = expert_capacity.",
      "SwitchFFN.num_experts = %d" % config.num_experts,
      "SwitchFFN.hidden_size = %d_ff",
      "SwitchFFN.activation = %r" % activation,
      "SwitchFFN.capacity_factor_train = 0.0",
      "SwitchFFN.capacity_factor_eval = 0.0",
      "SwitchFFN.min_capacity = %d" % config.expert_capacity,
      "# HF also routes inference with that capacity (mtf_switch's default there is dropless);",
      "# one group per sequence keeps requests apart either way.",
      "SwitchFFN.dropless_predict = False",
      "SwitchFFN.router_policy = %r" % ("input_jitter" if config.router_jitter_noise else
                                        "argmax"),
      "SwitchFFN.jitter_eps = %r" % float(config.router_jitter_noise),
      "SwitchFFN.loss_coef = %r" % config.router_aux_loss_coef,
      "SwitchFFN.router_z_loss_coef = %r" % config.router_z_loss_coef,
      "SwitchFFN.expert_dropout_rate = %dropout_rate",
  ]
  for stack, sparse, period, attentions in _stacks(config):
    block = []
    for is_sparse in sparse[:period]:
      block += ["@transformer_layers." + a for a in attentions] + [
          "@mtf_switch.convert_hf.PerSequenceSwitchFFN" if is_sparse else
          "@transformer_layers.DenseReluDense"]
    lines += ["", "# HF layers %s of %d sparse" % ([i for i, s in enumerate(sparse) if s],
                                                  len(sparse)),
              "%s/make_layer_stack.layers = [\n    %s,\n]" % (stack, ",\n    ".join(block)),
              "%s/make_layer_stack.num_layers = %d" % (stack, len(sparse) // period),
              "%s/make_layer_stack.block_scope = True" % stack]
  return "\n".join(lines) + "\n"


def _value(tensors, names, fn):
  return fn([tensors[name]() for name in names])


def convert(hf_dir, model_dir, vocabulary="t5"):
  """Converts the HF checkpoint in hf_dir into model_dir; returns {mtf variable: HF tensors}."""
  from transformers import SwitchTransformersConfig  # pylint: disable=g-import-not-at-top
  config = SwitchTransformersConfig.from_pretrained(hf_dir)
  check_config(config)
  mixture_or_task = VOCABULARIES.get(vocabulary, vocabulary)
  _check_vocabulary(mixture_or_task, config.vocab_size)
  tensors = _hf_tensors(hf_dir)

  def copy_of_shared(name):
    return np.array_equal(tensors[name](), tensors["shared.weight"]())

  # The stacks embed their inputs with shared.weight, of which embed_tokens (and a tied lm_head)
  # are copies; untied models saved by transformers 5 embed with their own embed_tokens, and
  # their forward does not read shared.weight.
  embeds = [name for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
            if name in tensors]
  shared_inputs = "shared.weight" not in tensors or all(map(copy_of_shared, embeds))
  unread = embeds if shared_inputs else ["shared.weight"]
  if config.tie_word_embeddings:
    unread += [name for name in ("lm_head.weight",) if name in tensors]
  plan = variable_map(config, shared_inputs)
  used = {name for names, _ in plan.values() for name in names}
  missing = sorted(used - set(tensors))
  unmapped = sorted(set(tensors) - used - set(unread))
  if missing or unmapped:
    raise ValueError("The checkpoint in %s does not match its config:%s%s" % (
        hf_dir, "\n  missing: " + ", ".join(missing) if missing else "",
        "\n  not mapped: " + ", ".join(unmapped) if unmapped else ""))
  if config.tie_word_embeddings and not (shared_inputs and all(map(copy_of_shared, unread))):
    raise ValueError("tie_word_embeddings, but embed_tokens or lm_head differ from shared.weight")

  tf.io.gfile.makedirs(model_dir)
  variables = {name: functools.partial(_value, tensors, names, fn)
               for name, (names, fn) in plan.items()}
  variables["global_step"] = lambda: np.array(0, np.int64)
  _write_checkpoint(os.path.join(model_dir, "model.ckpt-0"), variables)
  with tf.io.gfile.GFile(os.path.join(model_dir, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "model.ckpt-0"\n'
            'all_model_checkpoint_paths: "model.ckpt-0"\n')
  with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
    f.write(operative_config(config, mixture_or_task, shared_inputs, hf_dir))
  return {name: names for name, (names, _) in plan.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m mtf_switch.convert_hf",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True,
                      help="local directory of a SwitchTransformersForConditionalGeneration")
  parser.add_argument("--model_dir", required=True, help="where the mtf model goes")
  parser.add_argument("--vocabulary", default="t5",
                      help="t5, mtf_switch or a seqio task/mixture name (MIXTURE_NAME)")
  args = parser.parse_args(argv)
  plan = convert(args.hf_dir, args.model_dir, args.vocabulary)
  print("wrote %s: %d variables from %d HF tensors, and operative_config.gin" % (
      os.path.join(args.model_dir, "model.ckpt-0"), len(plan),
      sum(len(names) for names in plan.values())))


if __name__ == "__main__":
  main()

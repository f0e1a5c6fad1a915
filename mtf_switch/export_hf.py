"""Exports a model trained here as a Hugging Face SwitchTransformersForConditionalGeneration,
with the tokenizer of its SentencePiece vocabulary: the inverse of mtf_switch.convert_hf.

  python -m mtf_switch.export_hf --model_dir DIR --out HF_DIR [--checkpoint_step N]
      [--expert_capacity C] [--sequence_length L]

reads DIR/operative_config.gin (the architecture and MIXTURE_NAME, whose vocabulary the model
uses) and a checkpoint of DIR (the latest, or model.ckpt-N), and writes HF_DIR: config.json,
generation_config.json, model.safetensors (float32) and the tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, and the SentencePiece model as spiece.model).
Offline:
  SwitchTransformersForConditionalGeneration.from_pretrained(HF_DIR) and
  AutoTokenizer.from_pretrained(HF_DIR) (a tokenizers-backed fast tokenizer: transformers 5's
  T5Tokenizer rebuilds its Unigram model without SentencePiece's byte fallback, which the
  default corpus vocabulary uses). It encodes as seqio does, with sentinels between spaces or
  at the end (as span corruption writes them); HF decodes "a <extra_id_0> b" as
  "a<extra_id_0> b", as HF's own T5 tokenizers do.
Needs transformers and torch.

Exportable: what Hugging Face's architecture computes. Encoder-decoder stacks of T5 layers
(self-attention with the stack's shared relative attention bias, encoder-decoder attention in the
decoder, one FFN per layer, pre-norm RMS norms, no positional embedding), every FFN with one
activation ("relu", or mesh-tensorflow's tanh "gelu" -> "gelu_new"), top-1 token-choice Switch
layers at HF's positions (layer i of a stack sparse iff i % sparse_step == 1, or all), the same
d_ff, heads, d_kv and experts everywhere, tied or untied embeddings and shared or per-stack input
embeddings, and one SentencePiece vocabulary for inputs and targets. E.g. switch_tiny_classic,
switch_base_classic. Not exportable, one error listing every reason before anything is written:
gated FFNs or experts (GEGLU: switch_tiny, switch_base, st_moe_*), top-k > 1, a multiplicative
bias, batch-prioritized routing, no-token-left-behind, switch_max or expert-choice routers,
sparse-dense blocks (an extra dense FFN), other layer types or orders, positional embeddings,
and any variable left without a Hugging Face tensor.

The tensors are convert_hf.variable_map's, read backwards (convert_hf.to_hf). Training-only
settings carry over where HF has them (loss_coef -> router_aux_loss_coef, router_z_loss_coef,
input jitter -> router_jitter_noise; other router policies -> 0); HF's config has one dropout
rate (the model's dropout_rate macro).

Capacity (expert_capacity): mtf_switch routes groups of SwitchFFN.group_size tokens with C =
max(min(S, int(S * cf / E)), min_capacity) per group (and, by default, dropless at inference:
SwitchFFN.dropless_predict); HF routes each sequence on its own with a fixed expert_capacity,
also at inference (a token over capacity is carried by the residual only), and computes only
the routed tokens, so a large capacity costs nothing there. The default is the model's
evaluation capacity for one sequence of the model's input length L (--sequence_length, default
utils.run.sequence_length["inputs"], else 512): max(min(L, int(L * capacity_factor_eval / E)),
min_capacity). --expert_capacity=N sets it; N >= the longest sequence routes as mtf_switch's
dropless inference does (nothing dropped). Scores then agree to float rounding (the tests:
1e-4); with a smaller capacity HF drops where mtf_switch would not (or, with dropless_predict =
False, other tokens: mtf_switch's groups hold several sequences).
"""
import argparse
import os
import sys

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import transformer_layers
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import tensorflow.compat.v1 as tf

from mtf_switch import config as config_lib
from mtf_switch import convert_hf
from mtf_switch import dispatch
from mtf_switch import layers

# mesh-tensorflow activation -> HF dense_act_fn (inverse of convert_hf.ACTIVATIONS)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new"}
ATTENTIONS = {"encoder": [transformer_layers.SelfAttention],
              "decoder": [transformer_layers.SelfAttention, transformer_layers.EncDecAttention]}
FFNS = (transformer_layers.DenseReluDense, layers.SwitchFFN)
# The sublayers of T5's pre-norm stack (HF's computation), by function name.
SUBLAYERS = {"_sublayers_initial": ["sublayer_dropout"],
             "_sublayers_per_layer": ["sublayer_rms_norm", "sublayer_call_layer",
                                      "sublayer_dropout", "sublayer_residual"],
             "_sublayers_final": ["sublayer_rms_norm", "sublayer_dropout"]}
# SwitchFFN settings HF's top-1 router cannot reproduce: (attribute, exportable value, what).
SWITCH_REQUIRED = (("num_selected_experts", 1, "top-k routing with k > 1"),
                   ("router", "top_k", "a switch_max or expert-choice router"),
                   ("multiplicative_bias", False, "a multiplicative bias"),
                   ("batch_prioritized_routing", False, "batch-prioritized routing"),
                   ("no_token_left_behind", 0, "no-token-left-behind rerouting"))


def parse_operative_config(model_dir):
  """Parses model_dir/operative_config.gin over mesh-tensorflow's defaults, as the binary's
  --use_model_api modes do."""
  import t5.models.mesh_transformer  # pylint: disable=g-import-not-at-top,unused-import
  import mtf_switch.tasks  # pylint: disable=g-import-not-at-top,unused-import
  config_lib.parse([os.path.join(model_dir, "operative_config.gin")])


def vocabulary():
  """The SentencePiece vocabulary of the configured MIXTURE_NAME; ValueError unless inputs and
  targets share one."""
  import seqio  # pylint: disable=g-import-not-at-top
  name = _query("get_vocabulary.mixture_or_task_name", None)
  features = seqio.get_mixture_or_task(name).output_features
  vocabularies = {features[f].vocabulary for f in ("inputs", "targets") if f in features}
  if len(vocabularies) != 1 or not isinstance(next(iter(vocabularies)),
                                              seqio.SentencePieceVocabulary):
    raise ValueError("%s: inputs and targets need one SentencePiece vocabulary, got %s" % (
        name, ", ".join(map(str, vocabularies))))
  return vocabularies.pop()


def build(vocab_size):
  """The configured Bitransformer and the names of its variables, built for inference (nothing
  allocated)."""
  with tf.Graph().as_default():
    mesh = mtf.Mesh(mtf.Graph(), "export_mesh")
    model = mtf_utils.build_model(
        model_type=_query("utils.run.model_type", "bitransformer"),
        input_vocab_size=vocab_size, output_vocab_size=vocab_size,
        layout_rules=mtf.convert_to_layout_rules(""), mesh_shape=mtf.convert_to_shape(""))
    if not isinstance(model, transformer.Bitransformer):
      raise ValueError("Cannot export to Hugging Face SwitchTransformers: %s is not an "
                       "encoder-decoder (utils.run.model_type 'bitransformer')" %
                       type(model).__name__)
    ids = mtf.import_tf_tensor(mesh, tf.ones([1, 4], tf.int32),
                               mtf.Shape([mtf.Dimension("batch", 1),
                                          mtf.Dimension("length", 4)]))
    model.call_simple(inputs=ids, targets=ids, compute_loss=True,
                      mode=tf.estimator.ModeKeys.PREDICT,
                      variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.float32))
    return model, {v.name for v in mesh.graph.all_variables}


def _hf_layers(stack, layer_list, problems):
  """Whether each HF layer of a stack is sparse, from its mtf layers (None if they are not
  [attention..., FFN] per layer; the reasons go to problems)."""
  attentions = ATTENTIONS[stack]
  per_layer = len(attentions) + 1
  chunks = [layer_list[i:i + per_layer] for i in range(0, len(layer_list), per_layer)]
  if not all(len(c) == per_layer and [type(x) for x in c[:-1]] == attentions and
             isinstance(c[-1], FFNS) for c in chunks):
    problems.append("%s layers %s: HF's layers are %s and one FFN each (a sparse-dense block, "
                    "an extra FFN or another layer type cannot be represented)" % (
                        stack, [type(x).__name__ for x in layer_list],
                        " + ".join(a.__name__ for a in attentions)))
    return None
  return [isinstance(c[-1], layers.SwitchFFN) for c in chunks]


def _num_sparse(stack, sparse, problems):
  """HF's num_sparse_{stack}_layers giving this pattern (convert_hf.sparse_layers)."""
  n = len(sparse)
  for k in [sum(sparse)] + list(range(1, n + 1)):  # the count itself if it gives the pattern
    if k and convert_hf.sparse_layers(n, n // k) == sparse:
      return k
  problems.append("%s sparse layers %s of %d: HF puts them at i %% step == 1 (every other "
                  "layer from the second, every layer, ...)" % (
                      stack, [i for i, s in enumerate(sparse) if s], n))
  return 0


def _single(values, what, problems):
  """The one value of a set, else a problem naming them all."""
  values = sorted(set(values), key=repr)
  if len(values) != 1:
    problems.append("%s differs between layers: %s (HF has one)" % (what, values))
  return values[0] if values else None


def _activation(layer, problems):
  act = layer.activation
  if isinstance(act, (list, tuple)):
    act = act[0] if len(act) == 1 else tuple(act)
  if act not in ACTIVATIONS:
    problems.append("%s activation %r (exportable: %s; gated units such as GEGLU "
                    "['gelu', 'linear'] are not in HF's SwitchTransformers)" % (
                        type(layer).__name__, layer.activation, ", ".join(ACTIVATIONS)))
  return ACTIVATIONS.get(act)


def _query(name, default):
  """The value bound to name (macros resolved), or default."""
  if not config_lib.bound(name):
    return default
  value = gin.query_parameter(name)
  while isinstance(value, gin.config.ConfigurableReference) and \
      value.configurable.wrapped is gin.config.macro:
    value = gin.query_parameter("%" + value.scoped_selector.rpartition("/")[0])
  return value


def hf_config(model, expert_capacity=None, sequence_length=None):
  """(SwitchTransformersConfig, shared_inputs) of a built Bitransformer; ValueError listing
  every feature HF's architecture cannot represent."""
  from transformers import SwitchTransformersConfig  # pylint: disable=g-import-not-at-top
  problems, fields, everything = [], {}, []
  for stack in ("encoder", "decoder"):
    unitransformer = getattr(model, stack)
    layer_stack = unitransformer.layer_stack
    everything += layer_stack._layers  # pylint: disable=protected-access
    if unitransformer.positional_embedding:
      problems.append("%s positional embedding (HF: relative attention bias only)" % stack)
    for attribute, names in SUBLAYERS.items():
      found = [getattr(f, "__name__", repr(f)) for f in getattr(layer_stack, attribute)]
      if found != names:
        problems.append("%s LayerStack.%s = %s (HF computes %s)" % (
            stack, attribute[1:], found, names))
    sparse = _hf_layers(stack, layer_stack._layers, problems)  # pylint: disable=protected-access
    fields["num_layers" if stack == "encoder" else "num_decoder_layers"] = len(sparse or [])
    fields["num_sparse_%s_layers" % stack] = sparse and _num_sparse(stack, sparse, problems)
  attention = [x for x in everything if isinstance(x, transformer_layers.SelfAttention)]
  ffns = [x for x in everything if isinstance(x, FFNS)]
  switch = [x for x in ffns if isinstance(x, layers.SwitchFFN)]
  for layer in attention:
    expected = None if isinstance(layer, transformer_layers.EncDecAttention) else "bias_shared"
    if layer.relative_attention_type != expected or layer.shared_kv or layer.num_memory_heads:
      problems.append("%s relative_attention_type=%r, shared_kv=%r, num_memory_heads=%r (HF: "
                      "%r, False, 0)" % (type(layer).__name__, layer.relative_attention_type,
                                         layer.shared_kv, layer.num_memory_heads, expected))
  for layer in switch:
    problems += ["SwitchFFN %s (%s=%r)" % (what, name, getattr(layer, name))
                 for name, value, what in SWITCH_REQUIRED if getattr(layer, name) != value]
  problems += ["DenseReluDense use_bias=True (HF's FFNs have no bias)"
               for x in ffns if getattr(x, "use_bias", False)]
  single = {
      "d_ff": [x.hidden_size for x in ffns],
      "num_heads": [x.num_heads for x in attention],
      "d_kv": [x.key_value_size for x in attention],
      "relative_attention_num_buckets": [x.relative_attention_num_buckets for x in attention
                                         if x.relative_attention_type],
      "dense_act_fn": [_activation(x, problems) for x in ffns],
      "num_experts": [x.num_experts for x in switch]}
  if not switch:
    problems.append("no Switch layer (SwitchTransformers has sparse layers)")
  for field, values in single.items():
    fields[field] = _single(values, field, problems) if values else None
  if problems:
    raise ValueError("Cannot export to Hugging Face SwitchTransformers:\n  " +
                     "\n  ".join(dict.fromkeys(problems)))
  first = switch[0]
  if expert_capacity is None:
    length = sequence_length or _query("utils.run.sequence_length", {}).get("inputs", 512)
    expert_capacity = dispatch.expert_capacity(length, first.num_experts,
                                               first.capacity_factor_eval, first.min_capacity)
  config = SwitchTransformersConfig(
      vocab_size=model.decoder.output_vocab_dim.size, d_model=model.encoder.model_dim.size,
      expert_capacity=expert_capacity,
      dropout_rate=_query("%dropout_rate", 0.0),
      layer_norm_epsilon=_query("sublayer_rms_norm.epsilon", 1e-6),
      tie_word_embeddings=model.decoder.shared_embedding_and_softmax_weights,
      router_jitter_noise=first.jitter_eps if first.router_policy == "input_jitter" else 0.0,
      router_aux_loss_coef=first.loss_coef, router_z_loss_coef=first.router_z_loss_coef,
      router_bias=False, router_dtype="float32", router_ignore_padding_tokens=False,
      relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0, **fields)
  convert_hf.check_config(config)
  return config, model.shared_embedding


def _checkpoint(model_dir, step):
  if step is None:
    path = tf.train.latest_checkpoint(model_dir)
    if path is None:
      raise ValueError("%s holds no checkpoint" % model_dir)
    return path
  return os.path.join(model_dir, "model.ckpt-%d" % step)


def hf_state(plan, variables, read):
  """{HF tensor: float32 array} from the model's variable names and read(name) -> its value;
  every variable must be in the plan (variable_map) and every planned one built."""
  unmapped = sorted(set(variables) - set(plan))
  missing = sorted(set(plan) - set(variables))
  if unmapped or missing:
    raise ValueError("Cannot export to Hugging Face SwitchTransformers:%s%s" % (
        "\n  variables HF has no tensor for: " + ", ".join(unmapped) if unmapped else "",
        "\n  HF tensors the model lacks: " + ", ".join(missing) if missing else ""))
  state = {}
  for name, (hf_names, fn) in plan.items():
    arrays = convert_hf.to_hf(fn, np.asarray(read(name), np.float32))
    state.update(zip(hf_names, arrays))
  return state


def _hf_model(config, state):
  """The HF model holding state; the input embeddings (and a tied lm_head) that the plan does
  not name copy shared.weight, as HF's own ties do."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
  params = model.state_dict()
  copies = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] + (
      ["lm_head.weight"] if config.tie_word_embeddings else [])
  tensors = {name: torch.from_numpy(np.ascontiguousarray(value))
             for name, value in state.items()}
  tensors.update((name, tensors["shared.weight"]) for name in copies
                 if name not in tensors and "shared.weight" in tensors)
  if "shared.weight" not in tensors:  # per-stack input embeddings: shared.weight is unused
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
  unknown = sorted(set(tensors) - set(params))
  left = sorted(set(params) - set(tensors))
  if unknown or left:
    raise ValueError("HF tensors not in the model: %s; not set: %s" % (unknown, left))
  with torch.no_grad():
    for name, value in tensors.items():
      if tuple(params[name].shape) != tuple(value.shape):
        raise ValueError("%s: shape %s, HF expects %s" % (name, tuple(value.shape),
                                                          tuple(params[name].shape)))
      params[name].copy_(value)
  return model


def tokenizer(path, extra):
  """A fast tokenizer encoding and decoding as seqio's SentencePieceVocabulary of the local
  SentencePiece model `path` with `extra` extra ids (T5 ids, byte fallback, <extra_id_i> = id
  sp_size + extra - 1 - i)."""
  from tokenizers import decoders, models  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  t5 = transformers.T5Tokenizer.from_pretrained(os.path.dirname(path), vocab_file=path,
                                                extra_ids=extra)
  backend = t5.backend_tokenizer
  # T5Tokenizer drops SentencePiece's byte fallback (pieces <0x00>..<0xFF>) in both directions.
  scores = t5._vocab_scores  # pylint: disable=protected-access
  backend.model = models.Unigram(scores, unk_id=2, byte_fallback=True)
  backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
      extra_ids=extra, additional_special_tokens=["<extra_id_%d>" % i for i in range(extra)])


def export(model_dir, out, checkpoint_step=None, expert_capacity=None, sequence_length=None):
  """Writes the HF model and tokenizer of model_dir's checkpoint to out; returns the config."""
  parse_operative_config(model_dir)
  vocab = vocabulary()
  model, variables = build(vocab.vocab_size)
  config, shared_inputs = hf_config(model, expert_capacity, sequence_length)
  reader = tf.train.load_checkpoint(_checkpoint(model_dir, checkpoint_step))
  state = hf_state(convert_hf.variable_map(config, shared_inputs), variables, reader.get_tensor)
  hf = _hf_model(config, state)
  os.makedirs(out, exist_ok=True)
  spiece = os.path.join(out, "spiece.model")  # also a local copy of a remote (gs://) model
  tf.io.gfile.copy(vocab.sentencepiece_model_file, spiece, overwrite=True)
  hf.save_pretrained(out)
  tokenizer(spiece, vocab.extra_ids).save_pretrained(out)
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m mtf_switch.export_hf",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--model_dir", required=True,
                      help="model directory with operative_config.gin and checkpoints")
  parser.add_argument("--out", required=True, help="where the Hugging Face model goes")
  parser.add_argument("--checkpoint_step", type=int, default=None,
                      help="export model.ckpt-N (default: the latest checkpoint)")
  parser.add_argument("--expert_capacity", type=int, default=None,
                      help="HF's per-sequence expert_capacity (default: the model's evaluation "
                           "capacity for one sequence of --sequence_length tokens)")
  parser.add_argument("--sequence_length", type=int, default=None,
                      help="tokens per sequence for the default capacity (default: "
                           "utils.run.sequence_length['inputs'], else 512)")
  args = parser.parse_args(argv)
  try:
    config = export(args.model_dir, args.out, args.checkpoint_step, args.expert_capacity,
                    args.sequence_length)
  except ValueError as e:  # what cannot be exported: the list, no traceback
    sys.exit("error: %s" % e)
  print("wrote %s: SwitchTransformers, %d+%d layers, %d experts, expert_capacity %d, and its "
        "tokenizer" % (args.out, config.num_layers, config.num_decoder_layers,
                       config.num_experts, config.expert_capacity))


if __name__ == "__main__":
  main()

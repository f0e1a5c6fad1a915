r"""What a configuration makes each Switch layer do, before booking hardware:

  python -m mtf_switch.effective --gin_file=gin/models/switch_tiny.gin \
      --gin_file=gin/runs/pretrain_cpu.gin [--gin_param=...]

parses the gin files and bindings as t5_mesh_transformer does (mtf_switch/config.py), builds the
model for the recipe's batch, lengths, mesh and layout, in training and in evaluation, without
allocating anything, and prints one row per Switch layer and mode (train, eval, and predict:
decoding, scoring and the exports, as --mode=score builds them): experts E, experts per token
k (for SwitchFFN.router = "expert_choice" the E * C / S experts a token reaches on average: its
capacity applies in every mode, dropless routing does not apply to it), routing groups x group
size S, capacity factor (`dropless`: no capacity, SwitchFFN.dropless_*), expert capacity C per
group, router policy (prefixed by SwitchFFN.router when not top_k, e.g.
expert_choice:input_jitter), the dispatch `auto` resolves to on this machine, loss coefficients
c_B and c_z, init scale. A bad gin file or binding: one line on stderr, exit
status 1.
"""
import json
import sys

from absl import app
from absl import flags
from absl import logging
import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import layers


def switch_layers(mode):
  """Builds the configured model (utils.run's model type, batch, lengths, mesh and layout) in
  `mode` (tf.estimator.ModeKeys.TRAIN, EVAL or PREDICT, built as scoring is) without allocating
  anything; returns each Switch layer's settings (layers.LAYERS) as dicts."""
  query = gin.query_parameter
  lengths = query("utils.run.sequence_length")
  mesh_shape = query("utils.run.mesh_shape")
  if isinstance(mesh_shape, gin.config.ConfigurableReference):  # @utils.tpu_mesh_shape()
    mesh_shape = mtf_utils.tpu_mesh_shape() if config.bound("utils.tpu_mesh_shape.tpu_topology") \
        else ""
  mesh_shape = mtf.convert_to_shape(mesh_shape)
  layout_rules = mtf.convert_to_layout_rules(query("utils.run.layout_rules"))
  batch_size = mtf_utils.compute_batch_size(lengths, mesh_shape, layout_rules,
                                            query("utils.run.batch_size"))
  with tf.Graph().as_default():
    mesh = mtf.Mesh(mtf.Graph(), "config_mesh")
    model = mtf_utils.build_model(
        model_type=query("utils.run.model_type") if config.bound("utils.run.model_type")
        else "bitransformer", input_vocab_size=128, output_vocab_size=128,
        layout_rules=layout_rules, mesh_shape=mesh_shape)
    batch = mtf.Dimension("batch", batch_size)

    def ids(length):
      return mtf.import_tf_tensor(mesh, tf.ones([batch_size, length], tf.int32),
                                  mtf.Shape([batch, mtf.Dimension("length", length)]))

    model.call_simple(inputs=ids(lengths["inputs"]), targets=ids(lengths["targets"]),
                      compute_loss=True, mode=mode,
                      variable_dtype=mtf.VariableDType(tf.float32, tf.float32, tf.float32))
    return [json.loads(s) for s in tf.get_collection(layers.LAYERS)]


MODES = ((tf.estimator.ModeKeys.TRAIN, "train"), (tf.estimator.ModeKeys.EVAL, "eval"),
         (tf.estimator.ModeKeys.PREDICT, "predict"))
COLUMNS = (("layer", "scope"), ("E", "num_experts"), ("k", "experts_per_token"),
           ("groups x S", None), ("cf", "capacity_factor"), ("C", "expert_capacity"),
           ("router", "router_policy"), ("dispatch", "dispatch"), ("c_B", "loss_coef"),
           ("c_z", "router_z_loss_coef"), ("init", "init_scale"))


def table():
  """The Switch layers in training, evaluation and inference as text, one row per layer and
  mode."""
  rows = []
  for mode, name in MODES:
    for layer in switch_layers(mode):
      cells = [name]
      for title, key in COLUMNS:
        if layer["dropless"] and key in ("capacity_factor", "expert_capacity"):
          cells.append("dropless" if key == "capacity_factor" else "-")
          continue
        if key == "router_policy" and layer["router"] != "top_k":  # e.g. expert_choice:argmax
          cells.append("%s:%s" % (layer["router"], layer[key]))
          continue
        cells.append("%dx%d" % (layer["groups"], layer["group_size"]) if key is None
                     else layer["scope"][:-len("MoE1D/")] if key == "scope" else
                     str(layer[key]))
      rows.append(cells)
  head = ["mode"] + [title for title, _ in COLUMNS]
  widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in [head] + rows)


def main(argv):
  del argv
  logging.set_verbosity(logging.FATAL)  # the table, or one line of error
  fl = flags.FLAGS
  try:
    config.parse(fl.gin_file or (), fl.gin_param or ())
    print(table() or "no Switch layer")
    print("(C: expert capacity per group of S tokens; dropless: no capacity, no token dropped; "
          "dispatch: what `auto` resolves to on this machine, einsum on a TPU)")
  except Exception as e:  # pylint: disable=broad-except  (one line, no traceback)
    sys.exit("error: %s" % " ".join(str(e).split()))


if __name__ == "__main__":
  app.run(main)  # --gin_file and --gin_param are mesh-tensorflow's flags (transformer/utils.py)

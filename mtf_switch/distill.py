"""Distilling a Switch teacher into a dense student (Switch paper Sec. 4.2, Tables 6-8).

Two steps, both on the stock binary's checkpoints:
1. `python -m mtf_switch.distill --teacher_model_dir T --gin_file STUDENT.gin --model_dir S`
   writes S/model.ckpt-0: the student's variables that have a non-expert counterpart in the
   teacher (attention, dense FFNs, layer norms, embeddings, logits), copied from the teacher.
   The student's dense FFNs where the teacher has Switch layers are left out, so they start
   from their initialisers (the paper: "initializing the dense model with the non-expert
   weights"). S/init_variables.txt lists what was copied and what was not.
2. `t5_mesh_transformer --use_model_api --mode=finetune --pretrained_model_dir=S
   --gin_file=gin/runs/distill.gin --gin_param="Distillation.teacher_model_dir='T'" ...`
   trains the student on L = (1 - a) L_hard + a T^2 L_soft with a = 0.25, T = 1 (the paper's
   0.75 ground truth / 0.25 teacher probabilities). The teacher is built from
   T/operative_config.gin under the `teacher/` variable scope, frozen, and run in eval mode (no
   dropout, eval capacity factor). The student keeps the plain variable names, so the result
   evaluates, scores and exports as an ordinary dense model.
"""
import argparse
import contextlib
import os
import re

import gin
import mesh_tensorflow as mtf
from mesh_tensorflow.transformer import transformer
from mesh_tensorflow.transformer import utils as mtf_utils
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import layers

_SUBLAYER = re.compile(r"^(?P<stack>.+)/block_(?P<block>\d+)/layer_(?P<layer>\d+)/(?P<rest>.+)$")
TEACHER_SCOPE = "teacher"


def distillation_loss(hard_loss, student_logits, teacher_logits, targets, vocab_dim, denominator,
                      fraction_soft, temperature):
  """L = (1 - a) L_hard + a T^2 L_soft, L_soft = sum over real tokens of the cross-entropy of
  softmax(student / T) against softmax(teacher / T), over `denominator` as L_hard (Hinton et
  al. 2015; Switch Sec. 4.2 uses a = 0.25, T = 1)."""
  soft_targets = mtf.stop_gradient(mtf.softmax(teacher_logits / temperature, vocab_dim))
  soft = mtf.layers.softmax_cross_entropy_with_logits(
      student_logits / temperature, soft_targets, vocab_dim)
  soft = mtf.reduce_sum(soft * mtf.cast(mtf.greater(targets, 0), soft.dtype)) / denominator
  return (1.0 - fraction_soft) * hard_loss + fraction_soft * temperature ** 2 * soft


@contextlib.contextmanager
def _gin_config_of(model_dir):
  """Makes `model_dir`/operative_config.gin the only gin config for the duration; restores the
  current one (bindings, operative record, imports, singletons, lock) afterwards."""
  config = gin.config  # pylint: disable=protected-access
  path = os.path.join(model_dir, "operative_config.gin")
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        "%s does not exist: Distillation.teacher_model_dir must be a model directory written "
        "by t5_mesh_transformer (checkpoints and operative_config.gin)" % path)
  saved = ({k: dict(v) for k, v in config._CONFIG.items()},
           {k: dict(v) for k, v in config._OPERATIVE_CONFIG.items()},
           set(config._IMPORTS), dict(config._SINGLETONS), config._CONFIG_IS_LOCKED)
  gin.clear_config()
  try:
    gin.parse_config_file(path, skip_unknown=True)
    yield
  finally:
    for store, value in zip((config._CONFIG, config._OPERATIVE_CONFIG, config._IMPORTS,
                             config._SINGLETONS), saved[:4]):
      store.clear()
      store.update(value)
    config._set_config_is_locked(saved[4])


def _checkpoint(model_dir, step):
  path = (os.path.join(model_dir, "model.ckpt-%d" % step) if step >= 0
          else tf.train.latest_checkpoint(model_dir))
  if not path or not tf.io.gfile.exists(path + ".index"):
    raise FileNotFoundError("no checkpoint %s in %s" % (
        "model.ckpt-%d" % step if step >= 0 else "at all", model_dir))
  return path


@gin.configurable
class Distillation(transformer.Bitransformer):
  """A dense (or any) student Bitransformer trained against a frozen teacher's probabilities.

  Bind `make_bitransformer.bitransformer_cls = @mtf_switch.distill.Distillation` (distill.gin).
  Gin parameters (`Distillation.<name>`):
    teacher_model_dir: the teacher's model directory (operative_config.gin + checkpoints).
      Required.
    teacher_checkpoint_step: which checkpoint; -1 (default) for the latest.
    fraction_soft: a, the weight of the soft (teacher) loss; 0.25 (Switch Sec. 4.2).
    temperature: T of both softmaxes; 1.0 (the paper's; the soft loss is scaled by T^2).
  Only training uses the teacher; evaluation, scoring, decoding and export see the student.
  """

  def __init__(self, encoder, decoder, shared_embedding=True, teacher_model_dir=gin.REQUIRED,
               teacher_checkpoint_step=-1, fraction_soft=0.25, temperature=1.0):
    super().__init__(encoder, decoder, shared_embedding)
    if not 0.0 <= fraction_soft <= 1.0 or temperature <= 0.0:
      raise ValueError("Distillation needs 0 <= fraction_soft <= 1 and temperature > 0, got "
                       "fraction_soft=%r, temperature=%r" % (fraction_soft, temperature))
    self.teacher_model_dir = teacher_model_dir
    self.teacher_checkpoint_step = teacher_checkpoint_step
    self.fraction_soft = fraction_soft
    self.temperature = temperature
    self._has_teacher = False

  def call_simple(self, inputs, targets, compute_loss, mode=tf.estimator.ModeKeys.TRAIN,
                  variable_dtype=mtf.VariableDType(tf.float32), num_microbatches=1, **kwargs):
    logits, hard_loss = super().call_simple(
        inputs, targets, compute_loss, mode=mode, variable_dtype=variable_dtype,
        num_microbatches=num_microbatches, **kwargs)
    if not compute_loss or mode != tf.estimator.ModeKeys.TRAIN or self.fraction_soft == 0.0:
      return logits, hard_loss
    with _gin_config_of(self.teacher_model_dir), tf.variable_scope(TEACHER_SCOPE):
      teacher = transformer.make_bitransformer(
          input_vocab_size=self.encoder.input_vocab_dim.size,
          output_vocab_size=self.decoder.output_vocab_dim.size,
          layout=self.encoder.layout, mesh_shape=self.encoder.mesh_shape,
          bitransformer_cls=transformer.Bitransformer)
      teacher_logits, _ = teacher.call_simple(
          inputs, targets, False, mode=tf.estimator.ModeKeys.EVAL,
          variable_dtype=variable_dtype, num_microbatches=num_microbatches, **kwargs)
    graph = inputs.mesh.graph
    graph.make_variables_untrainable(
        [v for v in graph.trainable_variables if v.name.startswith(TEACHER_SCOPE + "/")])
    self._has_teacher = True
    return logits, distillation_loss(
        hard_loss, logits, mtf.cast(teacher_logits, logits.dtype), targets,
        self.output_vocab_dim, self.loss_denominator(targets, num_microbatches),
        self.fraction_soft, self.temperature)

  def initialize(self):
    """Called by mesh-tensorflow's training step: the teacher's variables are read from its
    checkpoint (they are never trained, and saved with the student's)."""
    if not self._has_teacher:
      return
    checkpoint = _checkpoint(self.teacher_model_dir, self.teacher_checkpoint_step)
    tf.train.init_from_checkpoint(checkpoint, {
        v.op.name[len(TEACHER_SCOPE) + 1:]: v
        for v in tf.get_collection(tf.GraphKeys.GLOBAL_VARIABLES, scope=TEACHER_SCOPE + "/")})


# ---------------------------------------------------------------- the student-init tool


def _by_sublayer(names):
  """{stack: [{rest: name} per sublayer, in order]}, and the names outside any sublayer."""
  stacks, other = {}, []
  for name in names:
    m = _SUBLAYER.match(name)
    if not m:
      other.append(name)
      continue
    key = (int(m["block"]), int(m["layer"]))
    stacks.setdefault(m["stack"], {}).setdefault(key, {})[m["rest"]] = name
  return {s: [subs[k] for k in sorted(subs)] for s, subs in stacks.items()}, other


def student_init_map(teacher_shapes, student_shapes):
  """{student variable: teacher variable} of the teacher's non-expert weights the student gets.

  Sublayers are matched by position in each stack (a teacher built from blocks of several
  layers numbers them differently from a dense model), variables within a sublayer by their
  name there and shape; outside sublayers (embeddings, final norms, logits) by name and shape.
  Switch variables (routers, experts, biases) are never copied.

  Raises:
    ValueError: a stack has a different number of sublayers in teacher and student.
  """
  teacher_stacks, teacher_other = _by_sublayer(teacher_shapes)
  student_stacks, student_other = _by_sublayer(student_shapes)
  pairs = [(name, name) for name in student_other if name in teacher_other]
  for stack, student_subs in student_stacks.items():
    teacher_subs = teacher_stacks.get(stack, [])
    if len(teacher_subs) != len(student_subs):
      raise ValueError(
          "stack %r has %d sublayers in the teacher and %d in the student: the student must "
          "have the teacher's layers (num_layers, and the same sublayers per layer)"
          % (stack, len(teacher_subs), len(student_subs)))
    for teacher_sub, student_sub in zip(teacher_subs, student_subs):
      pairs += [(name, teacher_sub[rest]) for rest, name in student_sub.items()
                if rest in teacher_sub]
  return {s: t for s, t in pairs
          if not layers.is_switch_variable(t)
          and list(teacher_shapes[t]) == list(student_shapes[s])}


def model_variables(vocab_size, length=8):
  """{name: shape} of the Bitransformer that the current gin config builds (graph only)."""
  with tf.Graph().as_default():
    graph = mtf.Graph()
    mesh = mtf.Mesh(graph, "mesh")
    model = transformer.make_bitransformer(
        input_vocab_size=vocab_size, output_vocab_size=vocab_size, layout="", mesh_shape="",
        bitransformer_cls=transformer.Bitransformer)
    ids = mtf.ones(mesh, mtf.Shape([mtf.Dimension("batch", 1), mtf.Dimension("length", length)]),
                   tf.int32)
    model.call_simple(ids, ids, compute_loss=True, mode=tf.estimator.ModeKeys.EVAL)
    return {v.name: v.shape.to_integer_list for v in graph.all_variables}


def _vocab_size(shapes):
  for name in ("decoder/logits/kernel", "shared/embedding", "decoder/embedding"):
    if name in shapes:
      return shapes[name][-1] if name.endswith("kernel") else shapes[name][0]
  raise ValueError("the teacher checkpoint has no logits or embedding variable")


def init_student(teacher_model_dir, model_dir, teacher_checkpoint_step=-1):
  """Writes model_dir/model.ckpt-0 (the copied variables), operative_config.gin (the student
  config) and init_variables.txt for the student that the current gin config defines."""
  reader = tf.train.load_checkpoint(_checkpoint(teacher_model_dir, teacher_checkpoint_step))
  teacher_shapes = reader.get_variable_to_shape_map()
  student_shapes = model_variables(_vocab_size(teacher_shapes))
  copy = student_init_map(teacher_shapes, student_shapes)
  tf.io.gfile.makedirs(model_dir)
  dtypes = reader.get_variable_to_dtype_map()
  with tf.Graph().as_default():
    variables = [tf.Variable(reader.get_tensor(t), name=s, dtype=dtypes[t])
                 for s, t in sorted(copy.items())]
    step = tf.train.get_or_create_global_step()
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      tf.train.Saver(variables + [step]).save(sess, os.path.join(model_dir, "model.ckpt"),
                                               global_step=0)
  with tf.io.gfile.GFile(os.path.join(model_dir, "operative_config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  used = set(copy.values())
  report = (["# copied from the teacher (student <- teacher)"]
            + ["%s <- %s" % kv for kv in sorted(copy.items())]
            + ["# student variables left to their initialisers"]
            + sorted(set(student_shapes) - set(copy))
            + ["# teacher variables not copied (optimizer slots not listed)"]
            + sorted(n for n in set(teacher_shapes) - used
                     if "_slot_" not in n and n != "global_step"))
  with tf.io.gfile.GFile(os.path.join(model_dir, "init_variables.txt"), "w") as f:
    f.write("\n".join(report) + "\n")
  return copy


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher_model_dir", required=True)
  parser.add_argument("--teacher_checkpoint_step", type=int, default=-1)
  parser.add_argument("--model_dir", required=True, help="where the student checkpoint goes")
  parser.add_argument("--gin_file", action="append", required=True,
                      help="the student model, e.g. gin/models/t5_tiny.gin (repeatable)")
  parser.add_argument("--gin_param", action="append", default=[])
  args = parser.parse_args(argv)
  config.parse(args.gin_file, args.gin_param)
  copy = init_student(args.teacher_model_dir, args.model_dir, args.teacher_checkpoint_step)
  print("wrote %s: %d variables copied from the teacher; see init_variables.txt"
        % (os.path.join(args.model_dir, "model.ckpt-0"), len(copy)))


if __name__ == "__main__":
  main()

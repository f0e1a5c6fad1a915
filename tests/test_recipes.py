"""gin/runs/pretrain_c4.gin is the paper's pretraining recipe, and pretrain_cpu.gin scales only
the documented knobs down."""
import gin
from mesh_tensorflow.transformer import learning_rate_schedules
from mesh_tensorflow.transformer import utils as mtf_utils
import numpy as np
import seqio
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import layers

PAPER_MODEL = ["gin/models/switch_base.gin", "gin/runs/pretrain_c4.gin",
               "gin/layouts/tpu_v3_32.gin"]
CPU_MODEL = ["gin/models/switch_tiny.gin", "gin/runs/pretrain_cpu.gin"]


def _learning_rates(steps):
  fn = gin.query_parameter("utils.run.learning_rate_schedule").scoped_configurable_fn
  total = gin.query_parameter("utils.run.train_steps")
  with tf.Graph().as_default(), tf.Session() as sess:
    return sess.run([fn(tf.constant(float(s)), total) for s in steps])


def _switch_settings():
  layer = layers.SwitchFFN()
  return {k: getattr(layer, k) for k in (
      "capacity_factor_train", "capacity_factor_eval", "loss_coef", "init_scale",
      "router_policy", "expert_dropout_rate")}


def test_pretrain_c4_is_the_papers_recipe():
  config.parse(PAPER_MODEL)
  query = gin.query_parameter
  assert query("%MIXTURE_NAME") == "c4_v220_span_corruption"
  assert "c4_v220_span_corruption" in seqio.TaskRegistry.names()
  assert query("utils.run.sequence_length") == {"inputs": 512, "targets": 114}
  assert query("utils.run.batch_size") == ("tokens_per_batch", 2 ** 20)
  assert query("utils.run.train_steps") == 550000
  assert query("utils.run.optimizer").configurable.name == "AdafactorOptimizer"
  assert query("%dropout_rate") == 0.0
  assert query("utils.get_variable_dtype.activation_dtype") == "bfloat16"
  # Inverse square root with 10k warm-up steps: 1e-2 up to step 10^4, then 1/sqrt(step).
  np.testing.assert_allclose(_learning_rates([1, 10000, 40000, 550000]),
                             [1e-2, 1e-2, 5e-3, 550000 ** -0.5], rtol=1e-6)
  assert _switch_settings() == {
      "capacity_factor_train": 1.25, "capacity_factor_eval": 2.0, "loss_coef": 1e-2,
      "init_scale": 0.1, "router_policy": "input_jitter", "expert_dropout_rate": 0.0}
  assert layers.SwitchFFN().num_experts == 128
  # Table 1: 32 cores, batch split 32 ways, experts over the batch axis.
  assert str(mtf_utils.tpu_mesh_shape()) == "Shape[batch=32]"
  assert "experts:batch" in query("utils.run.layout_rules")


def test_pretrain_cpu_changes_only_the_scale():
  config.parse(CPU_MODEL)
  query = gin.query_parameter
  assert query("%MIXTURE_NAME") == "mtf_switch_span_corruption"
  assert query("utils.run.sequence_length") == {"inputs": 128, "targets": 32}
  assert query("utils.run.batch_size") == ("sequences_per_batch", 16)
  assert query("utils.run.mesh_shape") == ""
  assert query("utils.get_variable_dtype.activation_dtype") == "float32"
  assert query("utils.run.optimizer").configurable.name == "AdafactorOptimizer"
  assert query("%dropout_rate") == 0.0
  np.testing.assert_allclose(_learning_rates([1, 600]), [1e-2, 1e-2], rtol=1e-6)
  assert _switch_settings() == {
      "capacity_factor_train": 1.25, "capacity_factor_eval": 2.0, "loss_coef": 1e-2,
      "init_scale": 0.1, "router_policy": "input_jitter", "expert_dropout_rate": 0.0}

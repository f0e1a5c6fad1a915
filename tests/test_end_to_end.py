"""The stock t5_mesh_transformer binary trains switch_tiny on the embedded corpus, and scores
checkpoints across SwitchFFN and mesh-tensorflow's MoE1D(switch) identically."""
import glob
import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import binary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE1D_GIN = os.path.join(REPO, "tests", "gin", "switch_tiny_moe1d.gin")
SWITCH_GIN = binary.SWITCH_GIN


@pytest.fixture(scope="module")
def env(binary_env):
  return binary_env


# MoE1D routes inference with its capacity (cf 2.0); SwitchFFN is dropless there by default, so
# the interchange tests pin the capacity-limited routing both layers share.
CAPACITY_AT_INFERENCE = ("SwitchFFN.dropless_predict=False",)


def score(env, model_dir, model_gin, tmp_path, *gin_params):
  inputs, targets = tmp_path / "inputs.txt", tmp_path / "targets.txt"
  inputs.write_text("Return the number of items in a container.\n"
                    "Open a file and return a stream. Raise OSError upon failure.\n"
                    "The with statement wraps the execution of a block.\n")
  targets.write_text("number of items\nreturn a stream\nexecution of a block\n")
  out = tmp_path / ("scores_" + os.path.basename(model_gin))
  gin_params += ("include 'score_from_file.gin'", "inputs_filename='%s'" % inputs,
                 "targets_filename='%s'" % targets, "scores_filename='%s'" % out,
                 "utils.run.batch_size=('sequences_per_batch', 4)",
                 "utils.run.eval_checkpoint_step=-1")
  binary.run(env, model_dir, "--gin_file=" + model_gin, "--gin_file=gin/runs/pretrain_cpu.gin",
             *["--gin_param=" + p for p in gin_params])
  return np.loadtxt(str(out) + ".scores")


def losses(model_dir):
  points = {}
  for path in glob.glob(os.path.join(str(model_dir), "events.out.tfevents.*")):
    for event in tf.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":  # host-call summaries hold tensors, the estimator's floats
          points[event.step] = float(tf.make_ndarray(value.tensor) if value.HasField("tensor")
                                     else value.simple_value)
  return [points[k] for k in sorted(points)]


def test_trains_switch_tiny_loss_falls_and_checkpoints(pretrained_switch):
  _, switch_dir, final_loss = pretrained_switch
  assert os.path.exists(os.path.join(switch_dir, "model.ckpt-40.index"))
  first_loss = losses(switch_dir)[0]  # step 1, from the TensorBoard events
  assert first_loss > 7.0  # ~ln(4196) for an untrained model
  assert final_loss < first_loss - 1.0, (first_loss, final_loss)
  with open(os.path.join(switch_dir, "operative_config.gin")) as f:
    assert "SwitchFFN.num_experts = 8" in f.read()
  names = [n for n, _ in tf.train.list_variables(str(switch_dir))]
  assert "encoder/block_000/layer_003/MoE1D/switch_gating/kernel" in names


def test_moe1d_checkpoint_scores_identically_under_switch_ffn(env, tmp_path):
  model_dir = tmp_path / "moe1d"
  binary.train(env, model_dir, MOE1D_GIN, 10, *binary.SMALL)
  by_moe1d = score(env, model_dir, MOE1D_GIN, tmp_path, *binary.SMALL)
  by_switch = score(env, model_dir, SWITCH_GIN, tmp_path, *binary.SMALL, *CAPACITY_AT_INFERENCE)
  assert by_moe1d.shape == (3,) and np.all(by_moe1d < 0)
  np.testing.assert_allclose(by_switch, by_moe1d, rtol=1e-5)  # float32 rounding (dispatch)


def test_switch_ffn_checkpoint_scores_identically_under_moe1d(pretrained_switch, tmp_path):
  env, switch_dir, _ = pretrained_switch
  by_switch = score(env, switch_dir, SWITCH_GIN, tmp_path, *binary.SMALL, *CAPACITY_AT_INFERENCE)
  by_moe1d = score(env, switch_dir, MOE1D_GIN, tmp_path, *binary.SMALL)
  assert by_switch.shape == (3,) and np.all(by_switch < 0)
  np.testing.assert_allclose(by_moe1d, by_switch, rtol=1e-5)


@pytest.mark.parametrize("layout,mesh", [("expert_model_data", "batch:2,model:2")])
def test_trains_over_a_multi_device_layout(env, tmp_path, layout, mesh):
  """4 logical CPU devices: experts over `batch` (all-to-all dispatch) plus model parallelism.
  (Expert replication is covered at layer level in test_distributed.py.)"""
  model_dir = tmp_path / layout
  final_loss = binary.train(env, model_dir, SWITCH_GIN, 4, *binary.SMALL,
                            flags=["--gin_file=gin/layouts/%s.gin" % layout])
  assert np.isfinite(final_loss)
  with open(os.path.join(str(model_dir), "operative_config.gin")) as f:
    assert "run.mesh_shape = '%s'" % mesh in f.read()


def test_trains_st_moe_tiny_in_bfloat16_with_encoder_bpr(env, tmp_path):
  """ST-MoE recipe (top-2, z-loss, sparse-dense, every fourth FFN) with bfloat16 activations and
  float32 routers, batch-prioritized routing in the encoder only."""
  model_dir = tmp_path / "st_moe"
  final_loss = binary.train(env, model_dir, "gin/models/st_moe_tiny.gin", 20, flags=[
      "--gin_param=utils.get_variable_dtype.activation_dtype='bfloat16'",
      "--gin_param=encoder/SwitchFFN.batch_prioritized_routing=True"])
  first_loss = losses(model_dir)[0]
  assert np.isfinite(final_loss) and final_loss < first_loss - 1.0, (first_loss, final_loss)
  # what ran is the model file's router (no input jitter), not a recipe's (tests/test_gin_layering)
  operative = (model_dir / "operative_config.gin").read_text()
  for stack in ("encoder", "decoder"):
    assert "%s/SwitchFFN.router_policy = 'argmax'" % stack in operative
  names = dict(tf.train.list_variables(str(model_dir)))
  for stack, layer in (("encoder", 7), ("decoder", 11)):
    prefix = "%s/block_000/layer_%03d/" % (stack, layer)
    assert names[prefix + "MoE1D/top_2_gating/kernel"] == [128, 8]
    assert prefix.replace("%03d" % layer, "%03d" % (layer + 1)) + "DenseReluDense/wo/kernel" \
        in names

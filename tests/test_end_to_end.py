"""The stock t5_mesh_transformer binary trains switch_tiny on the embedded corpus, and scores
checkpoints across SwitchFFN and mesh-tensorflow's MoE1D(switch) identically."""
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
MOE1D_GIN = os.path.join(REPO, "tests", "gin", "switch_tiny_moe1d.gin")
SWITCH_GIN = "gin/models/switch_tiny.gin"  # resolved through the package's gin search path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return dict(os.environ, MTF_SWITCH_CACHE=str(tmp_path_factory.mktemp("cache")),
              CUDA_VISIBLE_DEVICES="")


def t5_mesh_transformer(env, model_dir, model_gin, *gin_params, flags=()):
  """Runs the unmodified console script from a directory outside the repository."""
  cmd = [BINARY, "--module_import=mtf_switch", "--gin_file=" + model_gin,
         "--gin_file=gin/runs/pretrain_cpu.gin", "--model_dir=" + str(model_dir)]
  cmd += ["--gin_param=" + p for p in gin_params] + list(flags)
  proc = subprocess.run(cmd, cwd=str(model_dir.parent), env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def train(env, model_dir, model_gin, steps, flags=()):
  """Trains and returns the loss of the last step (TensorBoard gets it every 100 steps)."""
  proc = t5_mesh_transformer(env, model_dir, model_gin, "utils.run.train_steps=%d" % steps,
                             "utils.run.iterations_per_loop=%d" % (steps // 2),
                             "utils.run.save_checkpoints_steps=%d" % steps, flags=flags)
  return float(re.search(r"Loss for final step: ([0-9]+\.[0-9]+)", proc.stderr).group(1))


def score(env, model_dir, model_gin, tmp_path):
  inputs, targets = tmp_path / "inputs.txt", tmp_path / "targets.txt"
  inputs.write_text("Return the number of items in a container.\n"
                    "Open a file and return a stream. Raise OSError upon failure.\n"
                    "The with statement wraps the execution of a block.\n")
  targets.write_text("number of items\nreturn a stream\nexecution of a block\n")
  out = tmp_path / ("scores_" + os.path.basename(model_gin))
  t5_mesh_transformer(
      env, model_dir, model_gin, "include 'score_from_file.gin'",
      "inputs_filename='%s'" % inputs, "targets_filename='%s'" % targets,
      "scores_filename='%s'" % out, "utils.run.batch_size=('sequences_per_batch', 4)",
      "utils.run.eval_checkpoint_step=-1")
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


@pytest.fixture(scope="module")
def switch_run(env, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("switch") / "model"
  return model_dir, train(env, model_dir, SWITCH_GIN, 40)


def test_trains_switch_tiny_loss_falls_and_checkpoints(switch_run):
  switch_dir, final_loss = switch_run
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
  train(env, model_dir, MOE1D_GIN, 10)
  by_moe1d = score(env, model_dir, MOE1D_GIN, tmp_path)
  by_switch = score(env, model_dir, SWITCH_GIN, tmp_path)
  assert by_moe1d.shape == (3,) and np.all(by_moe1d < 0)
  np.testing.assert_allclose(by_switch, by_moe1d, rtol=1e-5)  # float32 rounding (dispatch)


def test_switch_ffn_checkpoint_scores_identically_under_moe1d(env, switch_run, tmp_path):
  switch_dir = switch_run[0]
  by_switch = score(env, switch_dir, SWITCH_GIN, tmp_path)
  by_moe1d = score(env, switch_dir, MOE1D_GIN, tmp_path)
  assert by_switch.shape == (3,) and np.all(by_switch < 0)
  np.testing.assert_allclose(by_moe1d, by_switch, rtol=1e-5)


def test_predicts_through_the_model_api(env, switch_run, tmp_path):
  # Incremental decoding feeds the Switch layers one position at a time.
  inputs = tmp_path / "inputs.txt"
  inputs.write_text("Return the number of items in a container.\nOpen a file.\n")
  out = tmp_path / "predictions.txt"
  t5_mesh_transformer(env, switch_run[0], SWITCH_GIN, flags=[
      "--use_model_api", "--mode=predict", "--input_file=%s" % inputs,
      "--output_file=%s" % out, "--batch_size=2", "--input_sequence_length=128",
      "--target_sequence_length=32"])
  lines = open(str(out) + "-40").read().splitlines()
  assert len(lines) == 2 and all(line.strip() for line in lines)


@pytest.mark.parametrize("layout,mesh", [("expert_model_data", "batch:2,model:2")])
def test_trains_over_a_multi_device_layout(env, tmp_path, layout, mesh):
  """4 logical CPU devices: experts over `batch` (all-to-all dispatch) plus model parallelism.
  (Expert replication is covered at layer level in test_distributed.py.)"""
  model_dir = tmp_path / layout
  final_loss = train(env, model_dir, SWITCH_GIN, 4,
                     flags=["--gin_file=gin/layouts/%s.gin" % layout])
  assert np.isfinite(final_loss)
  with open(os.path.join(str(model_dir), "operative_config.gin")) as f:
    assert "run.mesh_shape = '%s'" % mesh in f.read()


def test_trains_st_moe_tiny_in_bfloat16_with_encoder_bpr(env, tmp_path):
  """ST-MoE recipe (top-2, z-loss, sparse-dense, every fourth FFN) with bfloat16 activations and
  float32 routers, batch-prioritized routing in the encoder only."""
  model_dir = tmp_path / "st_moe"
  final_loss = train(env, model_dir, "gin/models/st_moe_tiny.gin", 20, flags=[
      "--gin_param=utils.get_variable_dtype.activation_dtype='bfloat16'",
      "--gin_param=encoder/SwitchFFN.batch_prioritized_routing=True"])
  first_loss = losses(model_dir)[0]
  assert np.isfinite(final_loss) and final_loss < first_loss - 1.0, (first_loss, final_loss)
  names = dict(tf.train.list_variables(str(model_dir)))
  for stack, layer in (("encoder", 7), ("decoder", 11)):
    prefix = "%s/block_000/layer_%03d/" % (stack, layer)
    assert names[prefix + "MoE1D/top_2_gating/kernel"] == [128, 8]
    assert prefix.replace("%03d" % layer, "%03d" % (layer + 1)) + "DenseReluDense/wo/kernel" \
        in names

"""The parts of benchmarks/reproduce.py: repeatable runs (gin/runs/seeded.gin) through the stock
binary, and the reading of its logs (checkpoint times, evaluations, speedups)."""
import importlib.util
import os
import re

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import binary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "reproduce", os.path.join(ROOT, "benchmarks", "reproduce.py"))
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)


def values(model_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
  return {n: np.asarray(reader.get_tensor(n)).astype(np.float64)
          for n in reader.get_variable_to_shape_map()}


def test_seeded_runs_repeat_and_the_seed_matters(tmp_path, binary_env):
  """Same SEED: the same variables after training (initialisation, data order, noise spans,
  router jitter; up to rounding) and the same held-out score; another SEED: different
  variables. Without seeded.gin, t5_mesh_transformer leaves TensorFlow's seed unset."""
  env = binary_env
  model = ["--gin_file=" + binary.SWITCH_GIN, "--gin_file=gin/runs/pretrain_cpu.gin",
           "--gin_file=gin/runs/seeded.gin"] + ["--gin_param=" + p for p in binary.SMALL + (
               "utils.run.train_steps=4", "utils.run.iterations_per_loop=2",
               "utils.run.save_checkpoints_steps=4", "utils.run.batch_size=('sequences_per_batch', 4)")]
  dirs = {name: tmp_path / name for name in ("a", "b", "c")}

  def train(name, seed):
    return binary.start(env, str(tmp_path), name, binary.BINARY, "--module_import=mtf_switch",
                        "--model_dir=" + str(dirs[name]), *model, "--gin_param=SEED=%d" % seed)

  binary.finish(train("a", 1), train("b", 1), train("c", 2))
  a, b, c = (values(dirs[n]) for n in "abc")
  assert a.keys() == b.keys() == c.keys()
  # Equal up to rounding, which grows over the steps: the embedding gradient's scatter-add sums
  # in thread order on CPU and the variables are bfloat16. A different seed differs far more.
  weights = [n for n in a if "_slot_" not in n and n != "global_step"]
  same = np.mean([np.abs(a[n] - b[n]).mean() for n in weights])
  other = np.mean([np.abs(a[n] - c[n]).mean() for n in weights])
  assert same < 0.05 * other, (same, other)

  def evaluate(name):
    return binary.start(env, str(tmp_path), name, binary.BINARY, "--module_import=mtf_switch",
                        "--model_dir=" + str(dirs["a"]), *model, "--gin_param=SEED=1",
                        "--gin_file=perplexity_eval.gin", "--gin_param=eval_checkpoint_step=-1",
                        "--gin_param=utils.run.dataset_split='validation'")

  runs = [evaluate("eval1"), evaluate("eval2")]
  binary.finish(*runs)
  scores = []
  for _, log in runs:
    with open(log) as f:
      scores.append(reproduce.evaluations(f.read()))
  assert scores[0].keys() == scores[1].keys() == {4}
  assert scores[0][4] == pytest.approx(scores[1][4], rel=1e-6)
  assert scores[0][4]["neg_log_perplexity"] < 0


LOG = """\
I1125 23:59:50.000000 1 basic_session_run_hooks.py:632] Saving checkpoints for 0 into m/model.ckpt.
INFO:tensorflow:Saving checkpoints for 100 into m/model.ckpt.
I1126 00:00:40.000000 1 basic_session_run_hooks.py:632] Saving checkpoints for 100 into m/model.ckpt.
I1126 00:01:20.000000 1 basic_session_run_hooks.py:632] Saving checkpoints for 200 into m/model.ckpt.
I1126 00:02:10.000000 1 basic_session_run_hooks.py:632] Saving checkpoints for 300 into m/model.ckpt.
I1126 00:03:00.000000 1 estimator.py:2066] Saving dict for global step 300: global_step = 300, \
loss = 1.5, neg_log_perplexity = -4.25, switch/encoder/block_000/layer_001/dropped_fraction = 0.125
"""


def test_reads_checkpoint_times_and_evaluations_from_the_logs():
  times, rate = reproduce.training_times(LOG)
  assert times == {0: 0.0, 100: 50.0, 200: 90.0, 300: 140.0}  # across midnight
  assert rate == pytest.approx(np.median([100 / 40, 100 / 50]))  # the warm-up interval left out
  assert reproduce.evaluations(LOG) == {300: {
      "global_step": 300.0, "loss": 1.5, "neg_log_perplexity": -4.25,
      "switch/encoder/block_000/layer_001/dropped_fraction": 0.125}}


def test_steps_to_the_dense_models_final_quality():
  xs, ys = np.array([100, 200, 300]), np.array([-5.0, -4.5, -4.0])
  assert reproduce.first_crossing(xs, ys, -4.75) == pytest.approx(150)
  assert reproduce.first_crossing(xs, ys, -4.0) == pytest.approx(300)
  assert reproduce.first_crossing(xs, ys, -5.5) == 100  # already there at the first point
  assert reproduce.first_crossing(xs, ys, -3.9) is None

  def result(nlp, steps_per_s):
    return {"eval": {str(s): {"neg_log_perplexity": v} for s, v in zip(xs, nlp)},
            "seconds_at_step": {str(s): s / steps_per_s for s in xs},
            "steps_per_s": steps_per_s, "dropped": None}

  rows = reproduce.summarize({"dense": result([-5.0, -4.5, -4.0], 4.0),
                              "switch-e8": result([-4.5, -4.0, -3.8], 2.0)})
  assert rows["dense"]["step_speedup"] == 1 and rows["dense"]["time_speedup"] == 1
  assert rows["switch-e8"]["steps_to_dense"] == pytest.approx(200)
  assert rows["switch-e8"]["step_speedup"] == pytest.approx(1.5)
  assert rows["switch-e8"]["time_speedup"] == pytest.approx(0.75)  # 75 s of dense vs 100 s
  assert rows["switch-e8"]["step_time_ratio"] == pytest.approx(2.0)


def test_every_run_of_the_suite_is_the_same_recipe_but_the_model():
  runs = reproduce.runs()
  names = [n for n, _, _ in runs]
  assert len(set(names)) == len(names) == 1 + len(reproduce.EXPERTS) + 5
  assert names[0] == "dense"
  for name, model_gin, params in runs:
    cmd = reproduce.command("/m/" + name, model_gin, params, 1000, 1)
    assert "--gin_file=" + reproduce.RUN_GIN in cmd and "--gin_param=SEED=1" in cmd
    assert os.path.exists(os.path.join(ROOT, model_gin))
    if name.startswith("top2"):
      assert model_gin.endswith("moe_mini_top2.gin")
    cf = re.search(r"cf([0-9.]+)$", reproduce.alias(name))
    if cf:
      assert "SwitchFFN.capacity_factor_train=%g" % float(cf.group(1)) in params or (
          reproduce.alias(name) == "switch-cf1.25")

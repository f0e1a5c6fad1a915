"""Fine-tuning, task evaluation and distillation through the stock t5_mesh_transformer binary
(--use_model_api --mode=finetune / eval), from a Switch checkpoint pretrained on the default
corpus."""
import glob
import os
import re

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import distill
from mtf_switch import layers

import binary

SIZES = ["--batch_size=8", "--input_sequence_length=64", "--target_sequence_length=16"]


def values(model_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
  return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
          if "_slot_" not in n and n != "global_step"}


def losses(log):
  return [float(x) for x in re.findall(r"step, tf_loss\[([-0-9.e]+)\]", log)]


def test_finetunes_the_non_moe_variables_with_the_papers_recipe_and_evaluates(
    pretrained_switch, tmp_path):
  env, pretrained_dir, _ = pretrained_switch
  model_dir = tmp_path / "finetuned"
  proc = binary.run(env, model_dir, "--use_model_api", "--mode=finetune",
                    "--pretrained_model_dir=%s" % pretrained_dir,
                    "--gin_file=gin/runs/finetune.gin",
                    "--gin_param=train_variables.subset='non_moe'",
                    "--mixture_or_task=mtf_switch_last_word", "--train_steps=3", *SIZES)
  assert len(losses(proc.stderr)) == 3 and np.all(np.isfinite(losses(proc.stderr)))
  before, after = values(pretrained_dir), values(model_dir)
  assert set(before) == set(after)
  frozen = {n for n in before if np.array_equal(before[n], after[n])}
  assert frozen == {n for n in before if layers.is_switch_variable(n)} and len(frozen) == 8
  # the recipe, not the pretraining values of the operative config, is what ran
  config = (model_dir / "operative_config.gin").read_text()
  for line in ("dropout_rate = 0.1", "encoder/SwitchFFN.expert_dropout_rate = 0.4",
               "decoder/SwitchFFN.capacity_factor_train = 1.25",
               "MtfModel.learning_rate_schedule = 0.001", "train_variables.subset = 'non_moe'"):
    assert line in config
  assert os.path.exists(model_dir / "model.ckpt-43.index")  # 40 pretraining + 3 steps

  binary.run(env, model_dir, "--use_model_api", "--mode=eval",
             "--mixture_or_task=mtf_switch_last_word", *SIZES)
  summaries = {}
  for path in glob.glob(str(model_dir / "validation_eval" / "events.*")):
    for event in tf.train.summary_iterator(path):
      summaries.update({v.tag: v.simple_value for v in event.summary.value})
  accuracy = summaries["eval/mtf_switch_last_word/accuracy"]
  targets = (model_dir / "validation_eval" / "mtf_switch_last_word_targets").read_text()
  predictions = (model_dir / "validation_eval" / "mtf_switch_last_word_43_predictions")
  hits = [t == p for t, p in zip(targets.splitlines(), predictions.read_text().splitlines())]
  assert len(hits) > 200 and accuracy == pytest.approx(100 * np.mean(hits))


def test_distills_the_switch_model_into_its_dense_twin(pretrained_switch, tmp_path):
  env, teacher_dir, _ = pretrained_switch
  init_dir, model_dir = tmp_path / "init", tmp_path / "student"
  distill.main(["--teacher_model_dir", str(teacher_dir), "--gin_file", "gin/models/t5_tiny.gin",
                "--model_dir", str(init_dir)] + ["--gin_param=" + p for p in binary.SMALL])
  proc = binary.run(env, model_dir, "--use_model_api", "--mode=finetune",
                    "--pretrained_model_dir=%s" % init_dir, "--gin_file=gin/runs/distill.gin",
                    "--gin_param=Distillation.teacher_model_dir='%s'" % teacher_dir,
                    "--mixture_or_task=mtf_switch_span_corruption", "--train_steps=3", *SIZES)
  assert len(losses(proc.stderr)) == 3 and np.all(np.isfinite(losses(proc.stderr)))
  teacher, init, student = values(teacher_dir), values(init_dir), values(model_dir)
  # the teacher rides along frozen, read from its checkpoint
  assert {n for n in student if n.startswith("teacher/")} == {"teacher/" + n for n in teacher}
  for name in teacher:
    np.testing.assert_array_equal(student["teacher/" + name], teacher[name])
  # the student has the dense model's variables, starts from the copy and trains
  dense = {n for n in student if not n.startswith("teacher/")}
  assert not any(layers.is_switch_variable(n) for n in dense) and set(init) < dense
  assert all(not np.array_equal(student[n], init[n]) for n in init)

"""Fine-tuning and distillation at CPU scale, through the stock t5_mesh_transformer only.

  python benchmarks/finetune_distill.py [--steps 600] [--finetune_steps 300] [--workdir DIR]

1. Pretrains switch_tiny (the teacher) and its FLOP-matched dense twin t5_tiny on the embedded
   default corpus (gin/runs/pretrain_cpu.gin, `--steps` each).
2. Distils the teacher into t5_tiny (Switch Sec. 4.2): the student-init tool, then `--steps` of
   gin/runs/distill.gin (0.75 hard + 0.25 soft); as a control, the same init and steps with
   Distillation.fraction_soft=0 (ground truth only).
3. Fine-tunes the teacher and the dense twin on mtf_switch_last_word with gin/runs/finetune.gin
   (`--finetune_steps`) and evaluates exact-match accuracy on its validation split.
Reports held-out neg log perplexity (span corruption, validation split, no aux loss; the mean of
3 evaluations, as the noise spans are drawn anew each time) of every
pretrained/distilled model, its difference to the dense model and the share of the teacher's
gain over the dense model that the student keeps (the paper's Table 6 measure; meaningless when
that gain is within noise), and the fine-tuned accuracies, as markdown.
"""
import argparse
import glob
import os
import re
import subprocess
import sys

import tensorflow.compat.v1 as tf

BINARY = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
SIZES = ["--batch_size=16", "--input_sequence_length=128"]


def binary(model_dir, *flags):
  cmd = [BINARY, "--module_import=mtf_switch", "--model_dir=" + model_dir] + list(flags)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(proc.stderr[-3000:])
  return proc.stderr


def pretrain(model_dir, model_gin, steps):
  if not tf.train.latest_checkpoint(model_dir):
    binary(model_dir, "--gin_file=" + model_gin, "--gin_file=gin/runs/pretrain_cpu.gin",
           "--gin_param=utils.run.train_steps=%d" % steps)


def perplexity(model_dir, model_gin, repeats=3):
  """Mean held-out neg log perplexity over `repeats` evaluations (span corruption draws new
  noise spans every time)."""
  values = []
  for _ in range(repeats):
    log = binary(model_dir, "--gin_file=" + model_gin, "--gin_file=gin/runs/pretrain_cpu.gin",
                 "--gin_file=perplexity_eval.gin", "--gin_param=eval_checkpoint_step=-1",
                 "--gin_param=utils.run.dataset_split='validation'")
    values.append(float(re.findall(r"neg_log_perplexity = ([-0-9.e]+)", log)[-1]))
  return sum(values) / len(values)


def finetune(model_dir, pretrained_dir, steps, *flags):
  if not tf.train.latest_checkpoint(model_dir):
    binary(model_dir, "--use_model_api", "--mode=finetune",
           "--pretrained_model_dir=" + pretrained_dir, "--train_steps=%d" % steps, *flags)


def accuracy(model_dir):
  log = binary(model_dir, "--use_model_api", "--mode=eval",
               "--mixture_or_task=mtf_switch_last_word", "--target_sequence_length=16", *SIZES)
  return float(re.findall(r"accuracy at step \d+: ([0-9.]+)", log)[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--finetune_steps", type=int, default=300)
  parser.add_argument("--workdir", default="runs/finetune_distill")
  args = parser.parse_args()
  d = lambda name: os.path.abspath(os.path.join(args.workdir, name))
  pretrain(d("teacher"), "gin/models/switch_tiny.gin", args.steps)
  pretrain(d("dense"), "gin/models/t5_tiny.gin", args.steps)
  if not glob.glob(d("init") + "/model.ckpt-0.index"):
    subprocess.run([sys.executable, "-m", "mtf_switch.distill", "--teacher_model_dir",
                    d("teacher"), "--gin_file=gin/models/t5_tiny.gin", "--model_dir", d("init")],
                   check=True, capture_output=True)
  for name, soft in (("distilled", 0.25), ("hard_only", 0.0)):
    finetune(d(name), d("init"), args.steps, "--gin_file=gin/runs/distill.gin",
             "--gin_param=Distillation.teacher_model_dir='%s'" % d("teacher"),
             "--gin_param=Distillation.fraction_soft=%s" % soft,
             "--mixture_or_task=mtf_switch_span_corruption", "--target_sequence_length=32",
             *SIZES)
  nlp = {name: perplexity(d(name), gin) for name, gin in (
      ("teacher", "gin/models/switch_tiny.gin"), ("dense", "gin/models/t5_tiny.gin"),
      ("distilled", "gin/models/t5_tiny.gin"), ("hard_only", "gin/models/t5_tiny.gin"))}
  print("| model | held-out neg log perplexity | vs dense | share of the teacher's gain |")
  print("|---|---|---|---|")
  gain = nlp["teacher"] - nlp["dense"]
  for name, value in nlp.items():
    kept = "" if name in ("teacher", "dense") else "%.0f%%" % (100 * (value - nlp["dense"]) / gain)
    print("| %s | %.3f | %+.3f | %s |" % (name, value, value - nlp["dense"], kept))
  print("\n| fine-tuned on mtf_switch_last_word (%d steps) | validation accuracy |"
        % args.finetune_steps)
  print("|---|---|")
  for name in ("teacher", "dense"):
    finetune(d(name + "_last_word"), d(name), args.finetune_steps,
             "--gin_file=gin/runs/finetune.gin", "--mixture_or_task=mtf_switch_last_word",
             "--target_sequence_length=16", *SIZES)
    print("| %s | %.1f%% |" % (name, accuracy(d(name + "_last_word"))))


if __name__ == "__main__":
  main()

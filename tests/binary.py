"""Runs the unmodified t5_mesh_transformer console script for end-to-end tests."""
import os
import re
import subprocess
import sys

BINARY = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
SWITCH_GIN = "gin/models/switch_tiny.gin"  # resolved through the package's gin search path
# switch_tiny with 2 layers per stack (one sparse block): shorter graph builds and saves
SMALL = ("num_layers=2", "num_blocks=1")


def environment(cache_dir):
  """The environment of the runs: a private corpus/vocabulary cache and no GPU."""
  return dict(os.environ, MTF_SWITCH_CACHE=str(cache_dir), CUDA_VISIBLE_DEVICES="")


def run(env, model_dir, *flags):
  """Runs the binary with --module_import=mtf_switch on model_dir from a directory outside the
  repository; returns the finished process (its log is in .stderr)."""
  cmd = [BINARY, "--module_import=mtf_switch", "--model_dir=" + str(model_dir)] + list(flags)
  proc = subprocess.run(cmd, cwd=str(model_dir.parent), env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return proc


def start(env, workdir, name, *cmd):
  """Starts cmd in workdir (outside the repository), logging to workdir/name.log; returns the
  process and the log's path, for finish()."""
  log = os.path.join(workdir, name + ".log")
  with open(log, "w") as f:
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT), log


def finish(*runs):
  """Waits for started (process, log) pairs; each must succeed."""
  for proc, log in runs:
    with open(log) as f:
      assert proc.wait(timeout=900) == 0, f.read()[-5000:]


def train(env, model_dir, model_gin, steps, *gin_params, flags=()):
  """Pretrains with gin/runs/pretrain_cpu.gin (utils.run) and returns the last step's loss."""
  gin_params = ("utils.run.train_steps=%d" % steps,
                "utils.run.iterations_per_loop=%d" % max(1, steps // 2),
                "utils.run.save_checkpoints_steps=%d" % steps) + gin_params
  proc = run(env, model_dir, "--gin_file=" + model_gin, "--gin_file=gin/runs/pretrain_cpu.gin",
             *["--gin_param=" + p for p in gin_params], *flags)
  return float(re.search(r"Loss for final step: ([0-9]+\.[0-9]+)", proc.stderr).group(1))

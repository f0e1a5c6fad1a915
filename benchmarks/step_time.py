"""Training throughput of switch_tiny against its FLOP-matched dense twin t5_tiny, measured in
one run through the stock t5_mesh_transformer (CPU, embedded corpus, gin/runs/pretrain_cpu.gin).

  python benchmarks/step_time.py [--steps 200] [--rounds 2]

Prints a markdown table: median steps/s after the first loop (start-up excluded) and the ratio.
The models run alternately, `rounds` times each, so machine noise hits both alike.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

BINARY = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
MODELS = ("t5_tiny", "switch_tiny")


def steps_per_second(model, steps, workdir):
  model_dir = tempfile.mkdtemp(dir=workdir)
  proc = subprocess.run(
      [BINARY, "--module_import=mtf_switch", "--gin_file=gin/models/%s.gin" % model,
       "--gin_file=gin/runs/pretrain_cpu.gin", "--model_dir=" + model_dir,
       "--gin_param=utils.run.train_steps=%d" % steps,
       "--gin_param=utils.run.save_checkpoints_steps=%d" % steps],
      cwd=workdir, capture_output=True, text=True, check=True)
  rates = [float(r) for r in re.findall(r"INFO:tensorflow:global_step/sec: ([0-9.]+)",
                                        proc.stderr)]
  return statistics.median(rates[1:])  # the first rate includes graph start-up


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  rates = {m: [] for m in MODELS}
  with tempfile.TemporaryDirectory() as workdir:
    for _ in range(args.rounds):
      for model in MODELS:
        rates[model].append(steps_per_second(model, args.steps, workdir))
  dense = statistics.median(rates["t5_tiny"])
  print("| model | steps/s (median of %d runs x %d steps) | relative to t5_tiny |"
        % (args.rounds, args.steps))
  print("|---|---|---|")
  for model in MODELS:
    rate = statistics.median(rates[model])
    print("| %s | %.2f | %.2f |" % (model, rate, rate / dense))


if __name__ == "__main__":
  main()

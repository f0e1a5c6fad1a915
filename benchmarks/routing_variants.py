"""Top-1, top-2 and batch-prioritized routing at capacity factor 1.0: switch_tiny trained through
the stock t5_mesh_transformer on the embedded corpus (gin/runs/pretrain_cpu.gin), one variant
after the other with the same data order, steps and schedule.

  python benchmarks/routing_variants.py [--steps 600]

Prints a markdown table per variant: the training loss (final step, and the mean of the last 50
steps, from the binary's per-step log), the fraction of tokens that got no expert and the
fraction of routing requests (one per used choice) that found no slot (the Switch layers'
`unrouted_fraction` and `dropped_fraction` summaries, mean over layers and over the recorded
steps after the first) and steps/s.
"""
import argparse
import glob
import os
import re
import statistics
import subprocess
import sys
import tempfile

import tensorflow.compat.v1 as tf

BINARY = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
VARIANTS = {
    "top-1 (Switch)": [],
    "top-2 (MoE-Base: second expert w.p. min(1, g2/0.2))": [
        "SwitchFFN.num_selected_experts = 2", "SwitchFFN.router_policy = 'argmax'"],
    "top-1 + BPR in the encoder": ["encoder/SwitchFFN.batch_prioritized_routing = True"],
}


def run(params, steps, workdir):
  model_dir = tempfile.mkdtemp(dir=workdir)
  cmd = [BINARY, "--module_import=mtf_switch", "--gin_file=gin/models/switch_tiny.gin",
         "--gin_file=gin/runs/pretrain_cpu.gin", "--model_dir=" + model_dir,
         "--gin_param=utils.run.train_steps=%d" % steps,
         "--gin_param=utils.run.save_checkpoints_steps=%d" % steps,
         "--gin_param=SwitchFFN.capacity_factor_train = 1.0"]
  cmd += ["--gin_param=" + p for p in params]
  proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
  if proc.returncode:
    sys.exit(proc.stderr[-3000:])
  losses = [float(v) for v in re.findall(r"step, tf_loss\[([0-9.]+)\]", proc.stderr)]
  rates = [float(r) for r in re.findall(r"global_step/sec: ([0-9.]+)", proc.stderr)]
  summaries = {"unrouted_fraction": {}, "dropped_fraction": {}}
  for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
    for event in tf.train.summary_iterator(path):
      for value in event.summary.value:
        metric = value.tag.rpartition("/")[2]
        if value.tag.startswith("switch/") and metric in summaries and event.step > 1:
          summaries[metric].setdefault(value.tag, []).append(value.simple_value)
  result = {"final": losses[-1], "last50": statistics.mean(losses[-50:]),
            "layers": len(summaries["dropped_fraction"]),
            "steps_per_s": statistics.median(rates[1:])}
  for metric, layers in summaries.items():
    result[metric] = statistics.mean(statistics.mean(v) for v in layers.values())
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  args = parser.parse_args()
  print("| routing (cf 1.0, %d steps) | final loss | mean loss, last 50 steps | tokens without "
        "an expert | requests dropped | steps/s |" % args.steps, flush=True)
  print("|---|---|---|---|---|---|", flush=True)
  with tempfile.TemporaryDirectory() as workdir:
    for name, params in VARIANTS.items():
      r = run(params, args.steps, workdir)
      print("| %s | %.3f | %.3f | %.4f | %.4f | %.2f |" % (
          name, r["final"], r["last50"], r["unrouted_fraction"], r["dropped_fraction"],
          r["steps_per_s"]), flush=True)


if __name__ == "__main__":
  main()

"""Dropless training (SwitchFFN.dropless_train) vs the paper's capacity factor 1.25, through the
stock t5_mesh_transformer: the README's main command (switch_tiny, gin/runs/pretrain_cpu.gin,
600 steps, CPU, ragged dispatch) at E = 8 and E = 32 experts, and the dense twin t5_tiny, with
gin/runs/seeded.gin (SEED=--seed): every model starts from the same seed and sees the same
batches, and every evaluation scores the same held-out noise spans (unseeded, two evaluations of
one checkpoint with the same settings gave neg log perplexity -4.688 and -4.722).

  python benchmarks/dropless.py [--workdir /tmp/dropless_runs] [--experts 8 32] [--rounds 2]
                                [--timing_steps 200]

First every model trains for the main command's 600 steps, in turn, then its final checkpoint
is evaluated with the README's held-out command (perplexity_eval.gin on the `validation` split),
Switch models twice: with the paper's evaluation capacity factor 2.0 and dropless
(SwitchFFN.dropless_eval = True). Then `rounds` timing rounds (the order of the models reversed
every other round, so that machine noise hits all alike) resume each model's 600-step checkpoint
(trained routing, hence trained load imbalance) for `timing_steps` more steps, and record the
process' CPU seconds (all threads; the least disturbed by other work on the machine) and wall
seconds per step between its first global_step/sec report (start-up done) and its last. Step
time is the median over rounds. Prints a markdown table and writes WORKDIR/results.json.
Trainings whose WORKDIR/<name> holds a result.json of the same command are not run again.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mtf_switch import report  # pylint: disable=g-import-not-at-top
from reproduce import BINARY, run_binary  # pylint: disable=g-import-not-at-top  (benchmarks/)

EVAL = ["--gin_file=perplexity_eval.gin", "--gin_param=eval_checkpoint_step=-1",
        "--gin_param=utils.run.dataset_split='validation'"]


def models(experts):
  """[(name, model gin, gin params)]."""
  out = [("dense", "gin/models/t5_tiny.gin", [])]
  for e in experts:
    base = ["SwitchFFN.num_experts=%d" % e]
    out += [("switch-e%d-cf1.25" % e, "gin/models/switch_tiny.gin",
             base + ["SwitchFFN.capacity_factor_train=1.25"]),
            ("switch-e%d-dropless" % e, "gin/models/switch_tiny.gin",
             base + ["SwitchFFN.dropless_train=True"])]
  return out


def command(model_dir, model_gin, params, seed, *extra):
  return [BINARY, "--module_import=mtf_switch", "--gin_file=" + model_gin,
          "--gin_file=gin/runs/pretrain_cpu.gin", "--gin_file=gin/runs/seeded.gin",
          "--gin_param=SEED=%d" % seed] + ["--gin_param=" + p for p in params] + list(extra) + \
      ["--model_dir=" + model_dir]


def rates(log):
  """global_step/sec reports after the first (start-up); absl repeats each line, once."""
  return [float(r) for r in re.findall(r"^INFO:tensorflow:global_step/sec: ([0-9.]+)", log,
                                       re.M)][1:]


def evaluation(log):
  """{metric: value} of the last 'Saving dict for global step N: ...' (perplexity_eval)."""
  found = re.findall(r"Saving dict for global step (\d+): (.*)$", log, re.M)
  step, fields = found[-1]
  out = {k: float(v) for k, v in re.findall(r"([\w/.]+) = ([-0-9.e+]+)", fields)}
  out["step"] = int(step)
  return out


def mean_metric(values, metric):
  """Mean over the Switch layers of an evaluation metric (switch/<layer>/<metric>)."""
  found = [v for k, v in values.items() if k.startswith("switch/") and k.endswith("/" + metric)]
  return float(np.mean(found)) if found else None


def dropped_in_training(model_dir):
  """Mean over the Switch layers and the summary steps of dropped_fraction (None: dense)."""
  try:
    summaries = report.read_summaries(model_dir)
  except (FileNotFoundError, ValueError):
    return None
  values = [v for layer in summaries.values() for _, v in zip(*layer["dropped_fraction"])]
  return float(np.mean(values)) if values else None


def quality_run(name, model_gin, params, workdir, seed):
  model_dir = os.path.join(workdir, name)
  result_path = os.path.join(model_dir, "result.json")
  train_cmd = command(model_dir, model_gin, params, seed)
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    if result["command"] == " ".join(train_cmd):
      return result
    sys.exit("%s holds a run of another command; delete it." % model_dir)
  os.makedirs(model_dir, exist_ok=True)
  log_path = os.path.join(model_dir, "train.log")
  start = time.time()
  log = None
  if os.path.exists(log_path):  # a finished training of this command (its evaluation failed)
    with open(log_path) as f:
      log = f.read()
    if not (log.startswith(" ".join(train_cmd) + "\n") and "Loss for final step" in log):
      log = None
  log = log or run_binary(train_cmd, log_path)
  result = {"name": name, "command": " ".join(train_cmd), "train_wall_s": time.time() - start,
            "rates": rates(log), "dropped_in_training": dropped_in_training(model_dir),
            "eval": {}}
  with open(os.path.join(model_dir, "operative_config.gin")) as f:
    operative = f.read()
  for p in params:  # the command line's bindings reached every scope of the model
    key, value = p.split("=")
    found = re.findall(r"^(?:\w+/)*%s = (.*)$" % re.escape(key), operative, re.M)
    assert found and set(found) == {value}, (p, found)
  evals = [("cf2.0", [])]
  if name != "dense":
    evals.append(("dropless", ["SwitchFFN.dropless_eval=True"]))
  for label, extra in evals:
    cmd = command(model_dir, model_gin, params + extra, seed, *EVAL)
    start = time.time()
    values = evaluation(run_binary(cmd, os.path.join(model_dir, "eval_%s.log" % label)))
    result["eval"][label] = {
        "command": " ".join(cmd), "wall_s": time.time() - start, "step": values["step"],
        "neg_log_perplexity": values["neg_log_perplexity"],
        "dropped_fraction": mean_metric(values, "dropped_fraction")}
  with open(result_path, "w") as f:
    json.dump(result, f, indent=1)
  return result


def timed_binary(cmd, log_path):
  """Runs cmd; returns (CPU seconds, wall seconds, global_step/sec reports) of its process (all
  threads) between its first global_step/sec report (start-up done) and its last, sampled from
  /proc every 0.2 s. CPU time is what the other work on the machine disturbs least."""
  tick = os.sysconf("SC_CLK_TCK")
  with open(log_path, "w") as log:
    log.write(" ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  samples = []  # (reports so far, CPU seconds, wall seconds)
  while proc.poll() is None:
    try:
      with open("/proc/%d/stat" % proc.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
      break
    cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    with open(log_path) as f:
      reports = len(re.findall(r"^INFO:tensorflow:global_step/sec", f.read(), re.M))
    samples.append((reports, cpu, time.time()))
    time.sleep(0.2)
  if proc.wait():
    sys.exit("failed: %s\nsee %s" % (" ".join(cmd), log_path))
  last = max(n for n, _, _ in samples)
  first = next(x for x in samples if x[0] >= 1)
  end = next(x for x in samples if x[0] == last)
  return end[1] - first[1], end[2] - first[2], end[0] - first[0]


def timing_run(name, model_gin, params, workdir, steps, round_index, seed):
  """Resumes the quality run's 600-step checkpoint (trained routing) for `steps` more steps;
  returns {cpu_s_per_step, wall_s_per_step, rates}."""
  source = os.path.join(workdir, name)
  model_dir = os.path.join(workdir, "timing%d" % round_index, name)
  if os.path.exists(model_dir):
    shutil.rmtree(model_dir)
  os.makedirs(model_dir)
  for f in os.listdir(source):
    if f.startswith("model.ckpt-600.") or f == "checkpoint":
      shutil.copy(os.path.join(source, f), model_dir)
  with open(os.path.join(model_dir, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "model.ckpt-600"\n')
  log_path = os.path.join(model_dir, "train.log")
  cpu, wall, reports = timed_binary(command(model_dir, model_gin, params + [
      "utils.run.train_steps=%d" % (600 + steps),
      "utils.run.save_checkpoints_steps=%d" % (600 + steps)], seed), log_path)
  with open(log_path) as f:
    log = f.read()
  all_reports = len(rates(log)) + 1
  per_report = steps / all_reports  # steps between two global_step/sec reports
  return {"cpu_s_per_step": cpu / (reports * per_report),
          "wall_s_per_step": wall / (reports * per_report), "rates": rates(log)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/dropless_runs")
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--timing_steps", type=int, default=200)
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  runs = models(args.experts)
  results = {}
  for name, gin_file, params in runs:
    results[name] = quality_run(name, gin_file, params, args.workdir, args.seed)
    print("%s: %s" % (name, json.dumps(results[name]["eval"])), flush=True)
  timings = {name: [] for name, _, _ in runs}
  for i in range(1, args.rounds + 1):
    for name, gin_file, params in (runs[::-1] if i % 2 else runs):
      timings[name].append(timing_run(name, gin_file, params, args.workdir, args.timing_steps,
                                      i, args.seed))
      print("round %d %s: %s" % (i, name, json.dumps({k: v for k, v in timings[name][-1].items()
                                                       if k != "rates"})), flush=True)

  def median(name, key):
    return statistics.median(t[key] for t in timings[name])

  fmt = lambda x: "-" if x is None else "%.3f" % x
  summary = []
  print("| model | CPU s/step | CPU step time / dense | wall s/step | wall / dense | dropped in "
        "training | held-out neg log perplexity, eval cf 2.0 (dropped) | dropless eval |")
  print("|---|---|---|---|---|---|---|---|")
  for name, _, _ in runs:
    r = results[name]
    cf2, dl = r["eval"]["cf2.0"], r["eval"].get("dropless")
    cpu, wall = median(name, "cpu_s_per_step"), median(name, "wall_s_per_step")
    cpu_ratio = cpu / median("dense", "cpu_s_per_step")
    wall_ratio = wall / median("dense", "wall_s_per_step")
    print("| %s | %.3f | %.2f | %.3f | %.2f | %s | %.3f (%s) | %s |" % (
        name, cpu, cpu_ratio, wall, wall_ratio, fmt(r["dropped_in_training"]),
        cf2["neg_log_perplexity"], fmt(cf2["dropped_fraction"]), "-" if dl is None else
        "%.3f (%s)" % (dl["neg_log_perplexity"], fmt(dl["dropped_fraction"]))))
    summary.append(dict(name=name, cpu_s_per_step=cpu, cpu_over_dense=cpu_ratio,
                        wall_s_per_step=wall, wall_over_dense=wall_ratio,
                        timings=timings[name], **{k: r[k] for k in (
                            "dropped_in_training", "eval", "command")}))
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()

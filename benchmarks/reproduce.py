"""The Switch paper's central results at CPU scale, through the stock t5_mesh_transformer only.

  python benchmarks/reproduce.py [--steps N] [--seed S] [--only NAME ...] [--workdir DIR]
                                 [--gin_param=BINDING ...] [--no_results]

Trains, one after the other on this machine, on GCIDE (../shared/data/gcide.txt.gz; the hashed
1% validation split of mtf_switch.tasks is held out) with gin/runs/reproduce_cpu.gin (same data
order, steps, batch, learning-rate schedule and seed for every model):
  - Fig. 4: the dense t5_mini and FLOP-matched switch_mini with E = 2, 4, 8, 16, 32 experts;
  - Table 1: switch_mini vs moe_mini_top2 (top-2) at E = TABLE1_EXPERTS and training capacity
    factors 1.0, 1.25 and 2.0 (evaluation always at 2.0, as in pretrain_c4.gin).
Then evaluates every saved checkpoint on the held-out split (perplexity_eval, the same noise
spans for every model and checkpoint) and writes benchmarks/reproduce/*.png and the section of
benchmarks/RESULTS.md between its markers: held-out neg log perplexity at fixed steps, steps and
training seconds to the dense model's final quality (the paper's speedup), step time relative to
dense (this run), fraction of routing requests dropped in training, and the paper's numbers.
Runs with a result.json in --workdir are not run again (delete --workdir to start over); a run
stopped before its result.json resumes from its last checkpoint when the command is repeated
(its training log keeps every process's checkpoint times).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mtf_switch import report  # pylint: disable=g-import-not-at-top

BINARY = os.path.join(os.path.dirname(sys.executable), "t5_mesh_transformer")
CORPUS = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "gcide.txt.gz"))
RUN_GIN = "gin/runs/reproduce_cpu.gin"
EXPERTS = (2, 4, 8, 16, 32)
TABLE1_EXPERTS = 16
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
PLOTS = os.path.join(ROOT, "benchmarks", "reproduce")
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
BEGIN, END = "<!-- reproduce.py: begin -->", "<!-- reproduce.py: end -->"

# Switch paper (arXiv 2101.03961v3), Table 1: T5-Base scale, 128 experts at every other FFN, 100k
# steps; (capacity factor, neg log perplexity at 100k steps, hours to -1.50, examples/s).
PAPER_TABLE1 = {
    "dense": (None, -1.731, None, 1600),
    "top2-cf2.0": (2.0, -1.547, 68.7, 840), "switch-cf2.0": (2.0, -1.554, 72.8, 860),
    "top2-cf1.25": (1.25, -1.559, 80.7, 790), "switch-cf1.25": (1.25, -1.553, 65.0, 910),
    "top2-cf1.0": (1.0, -1.572, 80.1, 860), "switch-cf1.0": (1.0, -1.561, 62.8, 1000),
}


def runs():
  """[(name, model gin, gin params)] in training order: the dense model and the largest Switch
  model first, so that a partial run already answers the main question."""
  out = [("dense", "gin/models/t5_mini.gin", [])]
  for e in sorted(EXPERTS, reverse=True):
    out.append(("switch-e%d" % e, "gin/models/switch_mini.gin", ["SwitchFFN.num_experts=%d" % e]))
  for cf in CAPACITY_FACTORS:
    table1 = table1_params(cf)
    if cf != 1.25:  # switch-e16 is trained at 1.25 already
      out.append(("switch-cf%r" % cf, "gin/models/switch_mini.gin", table1))
    out.append(("top2-cf%r" % cf, "gin/models/moe_mini_top2.gin", table1))
  return out


def table1_params(cf):
  """The bindings of a Table 1 run (switch-cf*, top2-cf*) at training capacity factor cf."""
  return ["SwitchFFN.num_experts=%d" % TABLE1_EXPERTS, "SwitchFFN.capacity_factor_train=%g" % cf]


def alias(name):
  """The Table 1 name of a run (switch-e16 is switch at capacity factor 1.25)."""
  return "switch-cf1.25" if name == "switch-e%d" % TABLE1_EXPERTS else name


def command(model_dir, model_gin, params, steps, seed, *extra):
  return [BINARY, "--module_import=mtf_switch", "--model_dir=" + model_dir,
          "--gin_file=" + model_gin, "--gin_file=" + RUN_GIN,
          "--gin_param=mtf_switch.tasks.text_files.paths=[%r]" % CORPUS,
          "--gin_param=utils.run.train_steps=%d" % steps, "--gin_param=SEED=%d" % seed,
          ] + ["--gin_param=" + p for p in params] + list(extra)


def run_binary(cmd, log_path, append=False):
  """Runs cmd, its output into log_path after a line holding the command (appended to the log
  with append: one segment per process of a resumed run); returns the whole log."""
  with open(log_path, "a" if append else "w") as log:
    log.write(" ".join(cmd) + "\n")
    log.flush()
    if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
      sys.exit("failed: %s\nsee %s" % (" ".join(cmd), log_path))
  with open(log_path) as log:
    return log.read()


_STAMP = r"^I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+) .*"


def _seconds(match):
  _, day, h, m, s = match.groups()[:5]
  return int(day) * 86400 + int(h) * 3600 + int(m) * 60 + float(s)


def training_times(log):
  """({checkpoint step: training seconds since step 0}, steps/s) from a training log with one
  segment per process (run_binary's append). steps/s is the median rate over the intervals
  between checkpoints of one process, after each process's first (which includes its warm-up);
  steps that no process in the log timed (a resumed run's earlier process, whose log was lost)
  count at that rate."""
  segments = []
  for text in re.split(r"^%s .*$" % re.escape(BINARY), log, flags=re.M):
    saved = {int(m.group(6)): _seconds(m) for m in re.finditer(
        _STAMP[:-2] + r".*Saving checkpoints for (\d+) into", text, re.M)}
    if saved:
      segments.append(saved)
  rates = []
  for saved in segments:
    steps = sorted(saved)
    intervals = [(b - a) / (saved[b] - saved[a]) for a, b in zip(steps, steps[1:])]
    rates += intervals[1:] or intervals
  rate = statistics.median(rates)
  seconds = {0: 0.0}
  for saved in segments:
    first = min(saved)
    if first not in seconds:  # resumed after steps no process here timed
      last = max(seconds)
      seconds[first] = seconds[last] + (first - last) / rate
    for step, t in saved.items():
      seconds.setdefault(step, seconds[first] + t - saved[first])
  return seconds, rate


def evaluations(log):
  """{step: {metric: value}} from perplexity_eval's 'Saving dict for global step N: ...'."""
  out = {}
  for step, fields in re.findall(r"^I.*Saving dict for global step (\d+): (.*)$", log, re.M):
    out[int(step)] = {k: float(v) for k, v in re.findall(r"([\w/.]+) = ([-0-9.e+]+)", fields)}
  return out


def dropped_in_training(model_dir, from_step):
  """Mean over the Switch layers and the summary steps >= from_step of dropped_fraction and
  unrouted_fraction (None for a dense model)."""
  try:
    summaries = report.read_summaries(model_dir)
  except (FileNotFoundError, ValueError):
    return None
  out = {}
  for metric in ("dropped_fraction", "unrouted_fraction"):
    values = [v for layer in summaries.values() for s, v in zip(*layer[metric]) if s >= from_step]
    out[metric] = float(np.mean(values)) if values else None
  return out


def train_and_evaluate(name, model_gin, params, args, eval_params=()):
  """Trains (unless --workdir holds this run's result.json) and evaluates the run's checkpoints
  (all of them, or what eval_params select); returns the run's result.json as a dict."""
  model_dir = os.path.join(args.workdir, name)
  result_path = os.path.join(model_dir, "result.json")
  params = params + args.gin_param
  train_cmd = command(model_dir, model_gin, params, args.steps, args.seed)
  cmd = " ".join(train_cmd)
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    if result["command"] != cmd:
      sys.exit("%s holds a run of another command:\n  %s\nnot\n  %s\nUse another --workdir, or "
               "delete that directory to train it again." % (model_dir, result["command"], cmd))
    return result
  os.makedirs(model_dir, exist_ok=True)
  start = time.time()
  log = run_binary(train_cmd, os.path.join(model_dir, "train.log"), append=True)
  train_wall = time.time() - start
  times, steps_per_s = training_times(log)
  start = time.time()
  log = run_binary(train_cmd + ["--gin_file=perplexity_eval.gin",
                               "--gin_param=utils.run.dataset_split='validation'"]
                   + list(eval_params),
                   os.path.join(model_dir, "eval.log"))
  evals = evaluations(log)
  result = {
      "name": name, "command": cmd,
      "train_wall_s": train_wall, "eval_wall_s": time.time() - start,
      "steps_per_s": steps_per_s,
      "seconds_at_step": {str(s): t for s, t in sorted(times.items())},
      "eval": {str(s): e for s, e in sorted(evals.items())},
      "dropped": dropped_in_training(model_dir, args.steps // 2),
  }
  with open(result_path, "w") as f:
    json.dump(result, f, indent=1)
  return result


# ---------------------------------------------------------------- analysis


def curve(result):
  """(steps, held-out neg log perplexity, training seconds) at the evaluated checkpoints."""
  steps = sorted(int(s) for s in result["eval"])
  nlp = [result["eval"][str(s)]["neg_log_perplexity"] for s in steps]
  secs = [result["seconds_at_step"].get(str(s), np.nan) for s in steps]
  return np.array(steps), np.array(nlp), np.array(secs)


def first_crossing(xs, ys, target):
  """The first x where the piecewise-linear curve (xs, ys) reaches ys >= target; None if never."""
  for i, y in enumerate(ys):
    if y >= target:
      if i == 0:
        return float(xs[0])
      return float(xs[i - 1] + (xs[i] - xs[i - 1]) * (target - ys[i - 1]) / (y - ys[i - 1]))
  return None


def summarize(results):
  """Per run: final quality, steps/seconds to the dense model's final quality, speedups."""
  d_steps, d_nlp, d_secs = curve(results["dense"])
  target, dense_rate = d_nlp[-1], results["dense"]["steps_per_s"]
  rows = {}
  for name, r in results.items():
    steps, nlp, secs = curve(r)
    at_step = first_crossing(steps, nlp, target)
    at_sec = first_crossing(secs, nlp, target)
    rows[name] = dict(
        final=nlp[-1], nlp=dict(zip(steps.tolist(), nlp.tolist())),
        steps_to_dense=at_step, step_speedup=(d_steps[-1] / at_step) if at_step else None,
        seconds_to_dense=at_sec, time_speedup=(d_secs[-1] / at_sec) if at_sec else None,
        step_time_ratio=dense_rate / r["steps_per_s"], steps_per_s=r["steps_per_s"],
        dropped=(r["dropped"] or {}).get("dropped_fraction"),
        unrouted=(r["dropped"] or {}).get("unrouted_fraction"))
  return rows


def _fmt(x, spec="%.3f", none="not reached"):
  return none if x is None else spec % x


def plot(results, rows):
  os.makedirs(PLOTS, exist_ok=True)
  ladder = ["dense"] + ["switch-e%d" % e for e in EXPERTS]
  table1 = ["dense"] + [alias(n) for n in (
      "switch-cf1.0", "switch-e%d" % TABLE1_EXPERTS, "switch-cf2.0", "top2-cf1.0", "top2-cf1.25",
      "top2-cf2.0")]
  by_alias = {alias(n): n for n in results}
  by_alias.update({n: n for n in results})
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(EXPERTS)))
  style = {"dense": dict(color="purple", lw=2.5)}
  style.update({"switch-e%d" % e: dict(color=c) for e, c in zip(EXPERTS, colors)})
  for cf, ls in zip(CAPACITY_FACTORS, (":", "-", "--")):
    style["switch-cf%r" % cf] = dict(color="tab:blue", ls=ls)
    style["top2-cf%r" % cf] = dict(color="tab:red", ls=ls)
  paths = []
  for x_index, xlabel, fname in ((0, "training step", "quality_vs_step.png"),
                                 (2, "training time (s, this machine)", "quality_vs_time.png")):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, names, title in ((axes[0], ladder, "Fig. 4: Switch with E experts vs dense"),
                             (axes[1], table1, "Table 1: Switch (top-1) vs MoE (top-2), E=%d"
                              % TABLE1_EXPERTS)):
      for n in names:
        if n not in by_alias:
          continue
        c = curve(results[by_alias[n]])
        keep = c[0] > 0  # step 0 (random init) would squash the interesting range
        ax.plot(c[x_index][keep], c[1][keep], marker="o", ms=3, label=n, **style.get(n, {}))
      ax.axhline(rows["dense"]["final"], color="purple", lw=0.8, ls="--")
      ax.set_xlabel(xlabel)
      ax.set_title(title, fontsize=10)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out neg log perplexity")
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, fname), dpi=110)
    plt.close(fig)
    paths.append(fname)
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (("step_speedup", "steps"), ("time_speedup", "training time")):
    xs = [e for e in EXPERTS if rows.get("switch-e%d" % e, {}).get(key)]
    ax.plot(xs, [rows["switch-e%d" % e][key] for e in xs], "o-", label="speedup in " + label)
  ax.axhline(1, color="purple", lw=0.8, ls="--")
  ax.set_xscale("log", base=2)
  ax.set_xticks(EXPERTS, [str(e) for e in EXPERTS])
  ax.set_xlabel("experts per Switch layer")
  ax.set_ylabel("dense steps (time) / Switch steps (time)\nto the dense model's final quality")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(PLOTS, "speedup_vs_experts.png"), dpi=110)
  plt.close(fig)
  return paths + ["speedup_vs_experts.png"]


def quality_at_seconds(result, seconds):
  """Held-out neg log perplexity after `seconds` of training (linear between checkpoints)."""
  _, nlp, secs = curve(result)
  return float(np.interp(seconds, secs, nlp))


def targets(results, rows):
  """[(claim, holds, numbers)] for the reproduction's targets (Fig. 4, Sec. 3.1, Table 1)."""
  out = []
  ladder = ["switch-e%d" % e for e in EXPERTS if "switch-e%d" % e in rows]
  dense = rows["dense"]["nlp"]
  if ladder:
    margins = {n: min(rows[n]["nlp"][s] - dense[s] for s in dense if s > 0) for n in ladder}
    out.append(("every Switch model beats the dense model at every evaluated step",
                all(m > 0 for m in margins.values()),
                "smallest margin: " + ", ".join("%s %+.3f" % kv for kv in margins.items())))
    finals = [rows[n]["final"] for n in ladder]
    out.append(("final quality improves monotonically with the number of experts",
                all(b > a for a, b in zip(finals, finals[1:])),
                ", ".join("%s %.3f" % (n, f) for n, f in zip(ladder, finals))))
    best = max(ladder, key=lambda n: rows[n]["step_speedup"] or 0)
    out.append(("the best Switch model reaches the dense model's final quality in at most a third "
                "of the steps (paper: 7.5x at 64 experts, Base scale)",
                (rows[best]["step_speedup"] or 0) >= 3,
                "%s: %s" % (best, _fmt(rows[best]["step_speedup"], "%.2fx"))))
  table1 = [n for n in results if alias(n).startswith(("switch-cf", "top2-cf"))]
  if "switch-cf1.0" in rows and any(n.startswith("top2") for n in table1):
    budget = min(results[n]["seconds_at_step"][str(max(map(int, results[n]["eval"])))]
                 for n in table1)
    at = {alias(n): quality_at_seconds(results[n], budget) for n in table1}
    top2 = max((n for n in at if n.startswith("top2")), key=at.get)
    out.append(("Switch at capacity factor 1.0 is at least as good per second as top-2 "
                "(Table 1's ordering)", at["switch-cf1.0"] >= at[top2],
                "neg log perplexity after %.0f s of training: switch-cf1.0 %.3f, best top-2 "
                "(%s) %.3f" % (budget, at["switch-cf1.0"], top2, at[top2])))
  return out


def markdown(results, rows, args, elapsed):
  steps = sorted(rows["dense"]["nlp"])
  shown = [s for s in steps if s > 0][-4:]
  out = [BEGIN, "",
         "`python benchmarks/reproduce.py --steps %d --seed %d%s` (%s; %.0f min on this machine, "
         "2 CPU cores). Every run: `%s`" % (
             args.steps, args.seed, "".join(' --gin_param="%s"' % p for p in args.gin_param),
             time.strftime("%Y-%m-%d"), elapsed / 60,
             results["dense"]["command"].replace(args.workdir, "WORKDIR")), "",
         "| model | " + " | ".join("step %d" % s for s in shown) +
         " | steps to dense final | speedup (steps) | speedup (time) | step time / dense "
         "| dropped (train) |",
         "|---|" + "---|" * (len(shown) + 5)]
  order = ["dense"] + ["switch-e%d" % e for e in EXPERTS] + [n for n, _, _ in runs()]
  for name in sorted(results, key=order.index):
    r = rows[name]
    out.append("| %s | %s | %s | %s | %s | %.2f | %s |" % (
        name if alias(name) == name else "%s = %s" % (name, alias(name)),
        " | ".join("%.3f" % r["nlp"][s] for s in shown),
        _fmt(r["steps_to_dense"], "%.0f"), _fmt(r["step_speedup"], "%.2fx"),
        _fmt(r["time_speedup"], "%.2fx"), r["step_time_ratio"],
        _fmt(r["dropped"], "%.3f", "-")))
  out += ["", "The issue's targets, checked on these numbers:", ""] + [
      "- %s: **%s** (%s)" % (claim, "yes" if ok else "no", detail)
      for claim, ok, detail in targets(results, rows)]
  out += ["", "Paper (Table 1, T5-Base scale, 128 experts, 100k steps) next to ours "
          "(E=%d, %d steps):" % (TABLE1_EXPERTS, args.steps), "",
          "| model | paper: neg log perp. | paper: hours to -1.50 | paper: examples/s | "
          "ours: neg log perp. | ours: seconds to dense final | ours: steps/s |",
          "|---|---|---|---|---|---|---|"]
  by_alias = {alias(n): n for n in results}
  for name, (cf, nlp, hours, speed) in PAPER_TABLE1.items():
    if name not in by_alias:
      continue
    r = rows[by_alias[name]]
    out.append("| %s | %.3f | %s | %d | %.3f | %s | %.2f |" % (
        name, nlp, _fmt(hours, "%.1f", "not achieved"), speed, r["final"],
        _fmt(r["seconds_to_dense"], "%.0f"), r["steps_per_s"]))
  out += ["", "![quality vs step](reproduce/quality_vs_step.png)",
          "![quality vs time](reproduce/quality_vs_time.png)",
          "![speedup vs experts](reproduce/speedup_vs_experts.png)", "", END]
  return "\n".join(out)


def write_section(section, begin, end, title):
  """Replaces RESULTS.md's text between the markers begin and end (or appends it under title)."""
  text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
  if begin in text:
    head, rest = text.split(begin, 1)
    text = head + section + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n## %s\n\n%s\n" % (title, section)
  with open(RESULTS, "w") as f:
    f.write(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--workdir", default="runs/reproduce")
  parser.add_argument("--only", nargs="*", help="train only these runs (default: all)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="an extra gin binding for every run (repeatable)")
  parser.add_argument("--no_results", action="store_true",
                      help="print the tables instead of writing RESULTS.md and the plots")
  args = parser.parse_args()
  if not os.path.exists(CORPUS):
    sys.exit("GCIDE not found at %s: the reproduction trains on ../shared/data/gcide.txt.gz "
             "next to the project directory" % CORPUS)
  args.workdir = os.path.abspath(args.workdir)
  results = {}
  for name, model_gin, params in runs():
    if args.only and name not in args.only:
      continue
    print("%-14s" % name, end=" ", flush=True)
    results[name] = train_and_evaluate(name, model_gin, params, args)
    print("final neg log perplexity %.4f, %.2f steps/s" % (
        curve(results[name])[1][-1], results[name]["steps_per_s"]), flush=True)
  if "dense" not in results:
    return
  rows = summarize(results)
  section = markdown(results, rows, args, sum(
      r["train_wall_s"] + r["eval_wall_s"] for r in results.values()))
  if args.no_results:
    print(section)
  else:
    plot(results, rows)
    write_section(section, BEGIN, END, "CPU-scale reproduction: Fig. 4 and Table 1")
    print(section)


if __name__ == "__main__":
  main()

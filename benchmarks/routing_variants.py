"""Routers side by side at CPU scale: top-1 (Switch), top-2 (MoE), batch-prioritized routing and
expert choice in the encoder, at training capacity factors 1.0 and 2.0, against the dense model.

  python benchmarks/routing_variants.py [--workdir DIR] [--steps N] [--seed S] [--no_results]

Every run is one of benchmarks/reproduce.py's, trained the same way (t5_mesh_transformer,
gin/runs/reproduce_cpu.gin on GCIDE, same data order, seed, steps and schedule), so dense,
switch-cf* and top2-cf* are reproduce.py's Table 1 runs (E = TABLE1_EXPERTS) and a --workdir
that holds them is reused. The new runs change only the encoder's router of switch_mini:
  - bpr-cf*: batch-prioritized routing (Riquelme et al. 2021; ST-MoE's encoder);
  - ec-cf*: expert choice (Zhou et al. 2022, MoE1D's expert_selection), evaluated at its training
    capacity factor (its capacity sets the experts per token: E C / S = cf on average), where
    every token-choice router is evaluated at capacity factor 2.0.
Each new run is evaluated at its last checkpoint only (reproduce.py's runs at every one).
Writes the section of benchmarks/RESULTS.md between this script's markers: held-out neg log
perplexity at the last step, its difference to dense, step time relative to dense (this run's
steps/s, median over checkpoint intervals) and the training fractions of tokens that got no
expert and of routing requests that found no slot.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # pylint: disable=g-import-not-at-top

BEGIN, END = "<!-- routing_variants.py: begin -->", "<!-- routing_variants.py: end -->"
ROUTERS = {
    "switch": ("top-1 (Switch)", "gin/models/switch_mini.gin", []),
    "top2": ("top-2 (MoE, second expert w.p. min(1, g2/0.2))", "gin/models/moe_mini_top2.gin", []),
    "bpr": ("top-1, batch-prioritized in the encoder", "gin/models/switch_mini.gin",
            ["encoder/SwitchFFN.batch_prioritized_routing=True"]),
    "ec": ("expert choice in the encoder, top-1 in the decoder", "gin/models/switch_mini.gin",
           ["encoder/SwitchFFN.router='expert_choice'"]),
}
CAPACITY_FACTORS = (1.0, 2.0)


def runs():
  """[(name, router description, model gin, gin params, evaluate every checkpoint)]."""
  out = [("dense", "dense (t5_mini)", "gin/models/t5_mini.gin", [], True)]
  for cf in CAPACITY_FACTORS:
    for key, (label, model_gin, params) in ROUTERS.items():
      table1 = reproduce.table1_params(cf)
      if key == "ec":
        table1.append("encoder/SwitchFFN.capacity_factor_eval=%g" % cf)
      out.append(("%s-cf%r" % (key, cf), label, model_gin, table1 + params,
                  key in ("switch", "top2")))
  return out


def markdown(results, args, elapsed):
  dense = results["dense"]
  step = max(int(s) for s in dense["eval"])
  d_nlp = dense["eval"][str(step)]["neg_log_perplexity"]
  out = [BEGIN, "",
         "`python benchmarks/routing_variants.py --steps %d --seed %d` (%s; %.0f min of training "
         "and evaluation on this machine, 2 CPU cores). Every run: `%s` plus the row's bindings."
         % (args.steps, args.seed, time.strftime("%Y-%m-%d"), elapsed / 60,
            dense["command"].replace(args.workdir, "WORKDIR")), "",
         "| router (E=%d) | training cf | held-out neg log perplexity, step %d | vs dense | "
         "step time / dense | tokens without an expert (train) | requests dropped (train) |"
         % (reproduce.TABLE1_EXPERTS, step), "|---|---|---|---|---|---|---|"]
  for name, label, _, _, _ in runs():
    r = results[name]
    nlp = r["eval"][str(step)]["neg_log_perplexity"]
    dropped = r["dropped"] or {}
    out.append("| %s | %s | %.3f | %s | %.2f | %s | %s |" % (
        label, name.partition("-cf")[2] or "-", nlp,
        "-" if name == "dense" else "%+.3f" % (nlp - d_nlp),
        dense["steps_per_s"] / r["steps_per_s"],
        reproduce._fmt(dropped.get("unrouted_fraction"), "%.3f", "-"),
        reproduce._fmt(dropped.get("dropped_fraction"), "%.3f", "-")))
  out += ["", END]
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--workdir", default="runs/reproduce",
                      help="run directory; reproduce.py's default, so its runs are reused")
  parser.add_argument("--no_results", action="store_true",
                      help="print the table instead of writing RESULTS.md")
  args = parser.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  args.gin_param = []
  results = {}
  for name, _, model_gin, params, every_checkpoint in runs():
    print("%-12s" % name, end=" ", flush=True)
    eval_params = [] if every_checkpoint else [
        "--gin_param=utils.run.eval_checkpoint_step=%d" % args.steps]
    results[name] = reproduce.train_and_evaluate(name, model_gin, params, args, eval_params)
    print("%.2f steps/s" % results[name]["steps_per_s"], flush=True)
  section = markdown(results, args, sum(
      r["train_wall_s"] + r["eval_wall_s"] for r in results.values()))
  print(section)
  if not args.no_results:
    reproduce.write_section(section, BEGIN, END, "Routers side by side at CPU scale (issue 19)")


if __name__ == "__main__":
  main()

"""Plots and a markdown summary of the Switch layers' routing metrics of a training run.

  python -m mtf_switch.report --model_dir DIR --out OUTDIR [--layer NAME] [--events_subdir SUB]

reads the TensorBoard event files (events.out.tfevents.*) of DIR (or DIR/SUB, e.g. an eval
directory) and writes into OUTDIR:

  expert_load_heatmap.png   expert load f_i of every Switch layer (rows: encoder then decoder,
                            in block/layer order) x expert (columns) at the last recorded step;
                            white is the uniform load 1/E, red an overloaded, blue an idle expert
  expert_load_<layer>.png   f_i of one layer over the training steps, one line per expert
                            (--layer, default the layer with the highest max imbalance at the
                            last step; `/` in the name becomes `_`)
  dropped_fraction.png      dropped_fraction and unrouted_fraction over steps, one line per layer
  aux_losses.png            balance_loss and z_loss over steps, one line per layer
  report.md                 a table of the last step's metrics per layer, and the plots

Each Switch layer records (mtf_switch/metrics.py, tags `switch/<layer>/<metric>`, <layer> e.g.
`encoder/block_000/layer_003`), over the layer's routing requests (one per used expert choice
of a real token):

  expert_fraction/<i>  f_i, the fraction of the requests served by expert i (i = 0 .. E-1)
  dropped_fraction     fraction of requests that found no free slot: sum_i f_i = 1 - this
  unrouted_fraction    fraction of real tokens that got no expert at all (= dropped for top-1)
  router_entropy       mean entropy (nats) of the router's distribution; ln E = uniform router
  top1_gate            mean router probability (gate) of a token's first choice; 1/E = uniform
  balance_loss         the load-balancing loss E sum_i f_i P_i (1 = balanced), before c_B
  z_loss               the router z-loss mean logsumexp(logits)^2, before c_z

The max imbalance of a layer is max_i f_i / mean_i f_i, where mean_i f_i = (1 - dropped)/E:
1 is a perfectly balanced layer, E one where a single expert serves every request.

t5_mesh_transformer writes these summaries while training (SwitchFFN.summaries = True, the
default), with the first step and then every 100 steps (the estimator's save_summary_steps;
the step recorded is the global step read in that run: 1, then 100 or 101, ...): as scalar
summaries off TPU, as tensor summaries through the TPU host call; both are read. An evaluation
(perplexity_eval) writes them, averaged over its batches, with `tokens` (real tokens per layer),
into its eval directory: read it with --events_subdir.
"""
import argparse
import glob
import os
import re

import numpy as np
import tensorflow.compat.v1 as tf
from matplotlib import colormaps
from matplotlib import colors
from matplotlib.ticker import MaxNLocator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mtf_switch import metrics

HOW_TO_FIX = ("train through t5_mesh_transformer --module_import=mtf_switch with "
              "SwitchFFN.summaries = True (the default; on TPU also "
              "tpu_estimator_model_fn.tpu_summaries = True, as gin/runs/pretrain_c4.gin sets); "
              "the summaries are written at step 1 and then every 100 steps")


def read_summaries(events_dir):
  """{layer: {metric: (steps, values)}} (int64 and float64 arrays sorted by step) of the Switch
  summaries in the event files of events_dir; a later file wins a step written twice."""
  if not os.path.isdir(events_dir):
    raise FileNotFoundError("%s is not a directory: pass the --model_dir of a training run"
                            % events_dir)
  paths = sorted(glob.glob(os.path.join(events_dir, "events.out.tfevents.*")))
  if not paths:
    subdirs = sorted(os.path.relpath(os.path.dirname(p), events_dir) for p in
                     glob.glob(os.path.join(events_dir, "*", "events.out.tfevents.*")))
    raise FileNotFoundError(
        "no TensorBoard event files (events.out.tfevents.*) in %s: pass the --model_dir of a "
        "t5_mesh_transformer training run%s" % (events_dir, (
            " (subdirectories with event files, for --events_subdir: %s)"
            % ", ".join(sorted(set(subdirs)))) if subdirs else ""))
  points, other_tags = {}, set()
  for path in paths:
    try:
      for event in tf.train.summary_iterator(path):
        for value in event.summary.value:
          layer_metric = metrics.parse(value.tag)
          if not layer_metric:
            other_tags.add(value.tag)
            continue
          x = (tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value)
          points.setdefault(layer_metric, {})[event.step] = float(x)
    except tf.errors.DataLossError:  # a file cut short (being written): keep what was read
      pass
  if not points:
    raise ValueError(
        "no Switch routing summaries (%s/<layer>/<metric>) in the event files of %s (tags "
        "found: %s): %s" % (metrics.PREFIX, events_dir,
                            ", ".join(sorted(other_tags)[:8]) or "none", HOW_TO_FIX))
  summaries = {}
  for (layer, metric), by_step in points.items():
    steps = np.array(sorted(by_step), np.int64)
    summaries.setdefault(layer, {})[metric] = (steps, np.array([by_step[s] for s in steps]))
  return {layer: summaries[layer] for layer in sorted(summaries, key=_layer_order)}


def _layer_order(layer):
  """Encoder before decoder, then blocks and layers by number (block_2 before block_10)."""
  stack = {"encoder": 0, "decoder": 1}.get(layer.split("/")[0], 2)
  return stack, [(0, int(p), "") if p.isdigit() else (1, 0, p)
                 for p in re.split(r"(\d+)", layer)]


def expert_loads(metrics_of_layer):
  """(steps, loads [steps, E]) of one layer: expert i's fraction f_i at each step."""
  names = sorted((m for m in metrics_of_layer if m.startswith("expert_fraction/")),
                 key=lambda m: int(m.rpartition("/")[2]))
  steps = np.unique(np.concatenate([metrics_of_layer[n][0] for n in names]))
  loads = np.full((len(steps), len(names)), np.nan)
  for i, name in enumerate(names):
    s, v = metrics_of_layer[name]
    loads[np.searchsorted(steps, s), i] = v
  return steps, loads


def _at(metrics_of_layer, metric, step):
  steps, values = metrics_of_layer.get(metric, ((), ()))
  return next((v for s, v in zip(steps, values) if s == step), float("nan"))


def last_step_table(summaries):
  """{layer: row} of the layer's last recorded step: step, loads (E), most/least loaded
  expert index, max_imbalance (max f_i / mean f_i), dropped_fraction, router_entropy, top1_gate."""
  table = {}
  for layer, m in summaries.items():
    steps, loads = expert_loads(m)
    load = loads[-1]
    table[layer] = dict(
        step=int(steps[-1]), loads=load, most=int(np.nanargmax(load)),
        least=int(np.nanargmin(load)), max_imbalance=np.nanmax(load) / np.nanmean(load),
        **{k: _at(m, k, steps[-1]) for k in ("dropped_fraction", "router_entropy", "top1_gate")})
  return table


def _save(fig, path):
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path


def _heatmap(table, path):
  layers = list(table)
  num_experts = max(len(r["loads"]) for r in table.values())
  loads = np.full((len(layers), num_experts), np.nan)
  for row, layer in zip(loads, layers):
    row[:len(table[layer]["loads"])] = table[layer]["loads"]
  uniform = 1.0 / num_experts
  fig = Figure(figsize=(max(6, 2.5 + 0.45 * num_experts), max(3.5, 1.6 + 0.45 * len(layers))))
  ax = fig.add_subplot()
  norm = colors.TwoSlopeNorm(uniform, 0.0, max(2 * uniform, np.nanmax(loads)))
  image = ax.imshow(loads, cmap="RdBu_r", norm=norm, aspect="auto")
  if num_experts <= 32 and len(layers) <= 48:
    for (r, c), v in np.ndenumerate(loads):
      if not np.isnan(v):
        ax.text(c, r, "%.3f" % v, ha="center", va="center", fontsize=7,
                color="white" if abs(norm(v) - 0.5) > 0.3 else "black")
  bar = fig.colorbar(image, ax=ax, pad=0.08)
  bar.set_label("expert load f_i (fraction of requests)")
  bar.ax.axhline(uniform, color="black", lw=1.5)
  bar.ax.text(-0.15, uniform, "1/E", ha="right", va="center", fontsize=8,
              transform=bar.ax.get_yaxis_transform())
  steps = sorted({r["step"] for r in table.values()})
  ax.set_title("Expert load at step %s (uniform load 1/E = %.4g, E = %d)"
               % ("/".join(map(str, steps)), uniform, num_experts))
  ax.set_xlabel("expert")
  ax.set_ylabel("Switch layer")
  ax.set_xticks(range(num_experts))
  ax.set_yticks(range(len(layers)), layers)
  return _save(fig, path)


def _expert_lines(layer, metrics_of_layer, path):
  steps, loads = expert_loads(metrics_of_layer)
  marker = "o" if len(steps) <= 20 else None
  fig = Figure(figsize=(9, 4.5))
  ax = fig.add_subplot()
  for i in range(loads.shape[1]):
    color = "C%d" % i if loads.shape[1] <= 10 else colormaps["turbo"](i / (loads.shape[1] - 1))
    ax.plot(steps, loads[:, i], marker=marker, color=color, label="expert %d" % i)
  ax.axhline(1.0 / loads.shape[1], color="black", ls="--", lw=1,
             label="uniform 1/E = %.4g" % (1.0 / loads.shape[1]))
  ax.set_title("Expert load of %s" % layer)
  _step_axis(ax, "expert load f_i (fraction of routing requests)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
            ncol=1 + loads.shape[1] // 24)
  return _save(fig, path)


def _step_axis(ax, ylabel, zero=True):
  ax.set_xlabel("training step")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(ylabel)
  if zero:
    ax.set_ylim(bottom=0)


def _per_layer_lines(summaries, names, path):
  """One subplot per metric in names, one line per layer; a shared legend on the right."""
  fig = Figure(figsize=(6 * len(names), 4.5))
  axes = fig.subplots(1, len(names), squeeze=False)[0]
  for ax, name in zip(axes, names):
    for j, (layer, m) in enumerate(summaries.items()):
      if name in m:
        steps, values = m[name]
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, color="C%d" % (j % 10),
                ls="-" if j < 10 else "--", label=layer)
    if name == "balance_loss":
      ax.axhline(1.0, color="black", ls=":", lw=1, label="1 (balanced)")
    ax.set_title(name)
    _step_axis(ax, name.replace("_", " "), zero=name.endswith("_fraction"))
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def write_report(summaries, out_dir, layer=None, source=None):
  """Writes the plots and report.md (module docstring) of read_summaries' output into out_dir;
  returns the written paths. layer: the layer of expert_load_<layer>.png (default: the one with
  the highest max imbalance at its last step); source: the events directory, for report.md."""
  table = last_step_table(summaries)
  if layer is None:
    layer = max(table, key=lambda k: table[k]["max_imbalance"])
  elif layer not in summaries:
    raise ValueError("no Switch layer %r in the summaries; available layers: %s"
                     % (layer, ", ".join(summaries)))
  os.makedirs(out_dir, exist_ok=True)
  layer_png = "expert_load_%s.png" % layer.replace("/", "_")
  paths = [
      _heatmap(table, os.path.join(out_dir, "expert_load_heatmap.png")),
      _expert_lines(layer, summaries[layer], os.path.join(out_dir, layer_png)),
      _per_layer_lines(summaries, ("dropped_fraction", "unrouted_fraction"),
                       os.path.join(out_dir, "dropped_fraction.png")),
      _per_layer_lines(summaries, ("balance_loss", "z_loss"),
                       os.path.join(out_dir, "aux_losses.png")),
  ]
  steps = sorted({r["step"] for r in table.values()})
  num_experts = sorted({len(r["loads"]) for r in table.values()})
  lines = [
      "# Switch routing report", "",
      "Routing metrics%s at step %s (the last step with Switch summaries) of %d Switch layers "
      "with E = %s experts." % (" of `%s`" % source if source else "", "/".join(map(str, steps)),
                                len(table), "/".join(map(str, num_experts))), "",
      "| layer | most loaded expert (f_i) | least loaded expert (f_i) | max imbalance "
      "| dropped fraction | router entropy | top-1 gate |",
      "|---|---|---|---|---|---|---|"]
  for name, r in table.items():
    lines.append("| %s | %d (%.4f) | %d (%.4f) | %.3f | %.4f | %.3f | %.3f |" % (
        name, r["most"], r["loads"][r["most"]], r["least"], r["loads"][r["least"]],
        r["max_imbalance"], r["dropped_fraction"], r["router_entropy"], r["top1_gate"]))
  lines += [
      "",
      "- expert load f_i: the fraction of the layer's routing requests (one per used expert "
      "choice of a real token) that expert i served; sum_i f_i = 1 - dropped fraction.",
      "- max imbalance = max_i f_i / mean_i f_i, where mean_i f_i = (1 - dropped fraction) / E: "
      "1 for a perfectly balanced layer, E when one expert serves every request.",
      "- dropped fraction: requests that found their expert full (over capacity).",
      "- router entropy: mean entropy of the router's distribution in nats (ln E = %s for a "
      "uniform router); top-1 gate: mean router probability of a token's first choice "
      "(1/E for a uniform router)." % "/".join("%.3f" % np.log(e) for e in num_experts),
      "",
      "## Plots", "",
      "Expert load per layer at the last step (white = uniform load 1/E):", "",
      "![expert load heatmap](expert_load_heatmap.png)", "",
      "Expert load of %s over training:" % layer, "",
      "![expert load of %s](%s)" % (layer, layer_png), "",
      "Dropped and unrouted fractions:", "",
      "![dropped fraction](dropped_fraction.png)", "",
      "Auxiliary losses (before their coefficients c_B, c_z):", "",
      "![auxiliary losses](aux_losses.png)", ""]
  paths.append(os.path.join(out_dir, "report.md"))
  with open(paths[-1], "w") as f:
    f.write("\n".join(lines))
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m mtf_switch.report", description=(
      "Plots and a markdown report of the Switch layers' routing summaries of a training run."))
  parser.add_argument("--model_dir", required=True, help="the t5_mesh_transformer model_dir")
  parser.add_argument("--out", required=True, help="output folder (created if needed)")
  parser.add_argument("--layer", help="layer of the expert-load-over-steps plot, e.g. "
                      "encoder/block_000/layer_003 (default: the most imbalanced one)")
  parser.add_argument("--events_subdir", default="",
                      help="read the event files of model_dir/EVENTS_SUBDIR instead")
  args = parser.parse_args(argv)
  events_dir = (os.path.join(args.model_dir, args.events_subdir) if args.events_subdir
                else args.model_dir)
  try:
    paths = write_report(read_summaries(events_dir), args.out, args.layer, source=events_dir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit("mtf_switch.report: error: %s" % e) from None
  for path in paths:
    print(path)


if __name__ == "__main__":
  main()

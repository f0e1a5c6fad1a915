"""Where the main command's start-up goes: switch_tiny against its dense twin t5_tiny, phase by
phase, from the stock binary's own log (issue 22).

  python benchmarks/startup_time.py [--workdir /tmp/startup] [--rounds 2] [--steps 1]

Runs the README's main command (gin/runs/pretrain_cpu.gin) for --steps training steps in a fresh
model directory, models alternating, --rounds times, and splits the time from the process'
start to the end of training at these log lines (absl timestamps; the process' start is the
log's first timestamped line, after TensorFlow's import):
  gin_and_estimator: to "Using an uncached FunctionDataset" (gin, the estimator);
  input_pipeline: to "Calling model_fn" (the dataset graph: corpus, vocabulary, span corruption);
  model_fn: to "Done calling model_fn" (mesh-tensorflow graph building and lowering);
  scaffold: to "Graph was finalized" (hooks, savers, summary ops; the graph is then frozen);
  session_and_init: to "Done with copy master to slices" (session, variable initialisation);
  graph_writing: to "Saving checkpoints for 0" (CheckpointSaverHook writes graph.pbtxt, and the
    graph and meta graph into the events file);
  checkpoint_0: to "after saving checkpoint 0" (variables and model.ckpt-0.meta, another copy
    of the meta graph: every later checkpoint costs as much);
  to_end: to "Loss for final step" (the first steps, which include TensorFlow's graph
    optimisation, and the final checkpoint).
Prints a table of the median seconds per phase and model and the graph's node count
(model.ckpt-0.meta), then a JSON line.
"""
import argparse
import json
import os
import re
import shutil
import statistics

from reproduce import BINARY, run_binary  # benchmarks/ is the script's folder

MODELS = ("switch_tiny", "t5_tiny")
PHASES = [
    ("gin_and_estimator", "Using an uncached FunctionDataset"),
    ("input_pipeline", "Calling model_fn."),
    ("model_fn", "Done calling model_fn."),
    ("scaffold", "Graph was finalized."),
    ("session_and_init", "Done with copy master to slices."),
    ("graph_writing", "Saving checkpoints for 0 "),
    ("checkpoint_0", "after saving checkpoint 0"),
    ("to_end", "Loss for final step"),
]
_STAMP = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")


def phases(log):
  """{phase: seconds} from a training log (each phase ends at the first line holding its
  marker)."""
  start, times, marks = None, {}, iter(PHASES)
  name, marker = next(marks)
  for line in log.splitlines():
    stamp = _STAMP.match(line)
    if not stamp:
      continue
    h, m, s = stamp.groups()
    t = int(h) * 3600 + int(m) * 60 + float(s)
    start = t if start is None else start
    if marker in line:
      times[name] = t - start - sum(times.values())
      name, marker = next(marks, (None, None))
      if name is None:
        return times
  raise ValueError("the log lacks %r" % marker)


def node_count(meta_path):
  from tensorflow.core.protobuf import meta_graph_pb2  # pylint: disable=g-import-not-at-top
  meta = meta_graph_pb2.MetaGraphDef()
  with open(meta_path, "rb") as f:
    meta.ParseFromString(f.read())
  return len(meta.graph_def.node) + sum(len(f.node_def) for f in meta.graph_def.library.function)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/startup")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--models", default=",".join(MODELS))
  args = parser.parse_args()
  models = args.models.split(",")
  os.makedirs(args.workdir, exist_ok=True)
  times = {m: [] for m in models}
  nodes = {}
  for r in range(args.rounds):
    for model in models if r % 2 == 0 else models[::-1]:
      model_dir = os.path.join(args.workdir, model)
      shutil.rmtree(model_dir, ignore_errors=True)
      log = run_binary([BINARY, "--module_import=mtf_switch", "--gin_file=gin/models/%s.gin" % model,
                        "--gin_file=gin/runs/pretrain_cpu.gin", "--model_dir=" + model_dir,
                        "--gin_param=utils.run.train_steps=%d" % args.steps],
                       os.path.join(args.workdir, "%s-%d.log" % (model, r)))
      times[model].append(phases(log))
      nodes[model] = node_count(os.path.join(model_dir, "model.ckpt-0.meta"))
  median = {m: {p: statistics.median(t[p] for t in times[m]) for p, _ in PHASES}
            for m in models}
  print("| phase | " + " | ".join("%s s" % m for m in models) + " |")
  print("|---" * (len(models) + 1) + "|")
  for p, _ in PHASES + [("total", None)]:
    print("| %s | " % p + " | ".join(
        "%.1f" % (sum(median[m].values()) if p == "total" else median[m][p]) for m in models)
          + " |")
  print("| graph nodes (with function bodies) | " + " | ".join(str(nodes[m]) for m in models)
        + " |")
  print(json.dumps({"median_seconds": median, "nodes": nodes, "rounds": args.rounds}))


if __name__ == "__main__":
  main()

"""Greedy decoding throughput of switch_tiny against its FLOP-matched dense twin t5_tiny, at batch
1 and 16, through the stock t5_mesh_transformer (`--mode=predict`) and through the exported
SavedModel (`--mode=export_predict`, served by plain TensorFlow), in one run.

  python benchmarks/decode_throughput.py [--workdir /tmp/decode_runs] [--prompts 1024] [--rounds 5]

Each model is trained first (unless WORKDIR/<model>/model.ckpt-600 exists) with the README's
main command (600 steps of gin/runs/pretrain_cpu.gin; t5_tiny with gin/models/t5_tiny.gin).
Inference uses each model directory's operative config and mtf_switch's defaults, so the
Switch layers decode dropless (SwitchFFN.dropless_predict = True, the ragged dispatch on CPU).

Prompts: span-corruption inputs made from lines of the default corpus (the middle word of each
replaced by <extra_id_0>), inputs 128 / targets 32 tokens; batch 16 measures --prompts sequences,
batch 1 a quarter as many, each after one warm-up batch. Each round measures every path and batch
size for both models, alternating them (switch first, then dense, the order reversed for every
other measurement), --rounds times:
  - binary: `--mode=predict --batch_size=B`; the time is taken from the binary's own log
    (absl timestamps of upstream's "decoded i" lines, written at i = 0, 1, 2, 4, ...) between
    the end of the first batch and the last logged batch, so start-up, graph building,
    checkpoint loading and the first batch are excluded;
  - SavedModel: exported with --batch_size=B, loaded in a Python process that imports only
    TensorFlow and tensorflow_text; one warm-up request, then requests of B prompts, each timed.
Every sequence decodes exactly 32 tokens (`Unitransformer.sample_autoregressive.stop_at_token =
None` and `Bitransformer.decode.max_decode_length = 32`, for the binary and the export alike; the
binary's decode length is otherwise the input length, 128), so both models do the same work.
Stopping at EOS, the two 600-step models answer at different lengths (2026-12-08: switch_tiny ~16
tokens per sequence, t5_tiny ~29), and time per token then measured the answers' lengths (the
encoder pass and a batch's tail spread over fewer tokens), not the decoders. Tokens: 32 per
sequence; steps: decoding-loop iterations, 32 per batch. The table gives the median over rounds
of tokens/s and ms per step, and the Switch/dense ratio of time per token: of the medians, of the
best rounds (the least disturbed by other processes) and per round; the 1-minute load average is
printed next to each measurement and the uptime at start and end (the machine is shared).
Results also go to WORKDIR/results.json. The exports are made once per run, model and batch size
(WORKDIR/saved_model_<model>_b<B>_export; an export bakes in the code that built it, so earlier
ones are deleted).
"""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

from reproduce import BINARY, run_binary  # benchmarks/ is the script's folder
MODELS = ("switch_tiny", "t5_tiny")
TRAIN_STEPS = 600
TARGET = 32
LENGTHS = ["--input_sequence_length=128", "--target_sequence_length=%d" % TARGET,
           "--gin_param=Bitransformer.decode.max_decode_length = %d" % TARGET,
           "--gin_param=Unitransformer.sample_autoregressive.stop_at_token = None"]
SERVE = r"""
import json, sys, time
import tensorflow as tf
import tensorflow_text  # noqa: F401  (SentencePiece ops)

saved_model, prompts_file, batch_size, out = sys.argv[1:]
batch_size = int(batch_size)
with open(prompts_file) as f:
  prompts = f.read().splitlines()
signature = tf.saved_model.load(saved_model).signatures["serving_default"]
signature(inputs=tf.constant(prompts[:batch_size]))  # warm-up
outputs, times = [], []
for start in range(batch_size, len(prompts) - batch_size + 1, batch_size):
  request = tf.constant(prompts[start:start + batch_size])
  begin = time.perf_counter()
  answer = signature(inputs=request)["outputs"].numpy()
  times.append(time.perf_counter() - begin)
  outputs.append([o.decode() for o in answer.tolist()])
with open(out, "w") as f:
  json.dump({"outputs": outputs, "times": times}, f)
"""


def log(message):
  print("[%s] %s" % (datetime.datetime.now().strftime("%H:%M:%S"), message), flush=True)


def train(model, workdir):
  model_dir = os.path.join(workdir, model)
  if os.path.exists(os.path.join(model_dir, "model.ckpt-%d.index" % TRAIN_STEPS)):
    log("%s: trained (model.ckpt-%d)" % (model, TRAIN_STEPS))
    return model_dir
  log("training %s (the README's main command)" % model)
  run_binary([BINARY, "--module_import=mtf_switch", "--gin_file=gin/models/%s.gin" % model,
       "--gin_file=gin/runs/pretrain_cpu.gin", "--model_dir=" + model_dir],
      os.path.join(workdir, model + ".train.log"))
  return model_dir


def prompts(count):
  """Span-corruption inputs from lines of the default corpus, spread over the corpus."""
  from mtf_switch.tasks import corpus  # pylint: disable=g-import-not-at-top
  with open(corpus.default_corpus_file(), encoding="utf-8") as f:
    lines = [l.split() for l in f.read().splitlines()]
  lines = [w for w in lines if 8 <= len(w) <= 40 and w[len(w) // 2].isalpha()]
  step = len(lines) / count
  chosen = [lines[int(i * step)] for i in range(count)]
  return [" ".join(w[:len(w) // 2] + ["<extra_id_0>"] + w[len(w) // 2 + 1:]) for w in chosen]


def work(sequences, batch_size):
  """Tokens and decoding-loop steps of `sequences` decodes of TARGET tokens each."""
  return dict(sequences=sequences, tokens=TARGET * sequences,
              steps=TARGET * sequences // batch_size)


_STAMP = re.compile(r"^I(\d{4}) (\d\d):(\d\d):(\d\d\.\d+) .*\] decoded (\d+): ", re.M)


def binary_rate(model_dir, batch_size, prompts_file, workdir, name):
  """Decoding time from the binary's log: from the end of the first batch (the log line of
  decode 0) to the end of the last batch whose first decode is logged (a power of 2)."""
  out = os.path.join(workdir, name + ".txt")
  text = run_binary([BINARY, "--module_import=mtf_switch", "--use_model_api", "--mode=predict",
              "--model_dir=" + model_dir, "--batch_size=%d" % batch_size,
              "--input_file=" + prompts_file, "--output_file=" + out] + LENGTHS,
             os.path.join(workdir, name + ".log"))
  stamps = {}
  for _, h, m, s, i in _STAMP.findall(text):
    stamps.setdefault(int(i), int(h) * 3600 + int(m) * 60 + float(s))
  # the last logged decode that starts a batch (i a multiple of batch_size)
  last = max(i for i in stamps if i % batch_size == 0)
  seconds = stamps[last] - stamps[0]
  (path,) = glob.glob(out + "-*")
  with open(path, encoding="utf-8") as f:
    decodes = f.read().splitlines()
  measured = decodes[batch_size:last + batch_size]  # batches 2 .. the last logged one
  return dict(work(len(measured), batch_size), seconds=seconds)


def saved_model_rate(model_dir, batch_size, prompts_file, workdir, name):
  export_dir = os.path.join(workdir, name + "_export")
  if not glob.glob(os.path.join(export_dir, "*", "saved_model.pb")):
    run_binary([BINARY, "--module_import=mtf_switch", "--use_model_api", "--mode=export_predict",
         "--model_dir=" + model_dir, "--batch_size=%d" % batch_size,
         "--export_dir=" + export_dir] + LENGTHS, os.path.join(workdir, name + "_export.log"))
  saved_model = sorted(glob.glob(os.path.join(export_dir, "*", "saved_model.pb")))[-1]
  out = os.path.join(workdir, name + ".json")
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  with open(os.path.join(workdir, name + ".log"), "w") as f:
    subprocess.run([sys.executable, "-c", SERVE, os.path.dirname(saved_model), prompts_file,
                    str(batch_size), out], stdout=f, stderr=subprocess.STDOUT, env=env,
                   check=True)
  with open(out) as f:
    served = json.load(f)
  sequences = sum(len(batch) for batch in served["outputs"])
  return dict(work(sequences, batch_size), seconds=sum(served["times"]))


def measure(path, model, model_dir, batch_size, prompts_file, workdir, round_index):
  name = "%s_%s_b%d" % (path, model, batch_size)
  load_before = os.getloadavg()[0]
  log("round %d: %s (load %.2f)" % (round_index + 1, name, load_before))
  measure_fn = binary_rate if path == "binary" else saved_model_rate
  result = measure_fn(model_dir, batch_size, prompts_file, workdir, name)
  result.update(path=path, model=model, batch_size=batch_size, round=round_index + 1,
                load=[load_before, os.getloadavg()[0]],
                tokens_per_s=result["tokens"] / result["seconds"],
                ms_per_step=1e3 * result["seconds"] / result["steps"])
  log("  %d sequences, %d tokens in %.2f s: %.1f tokens/s, %.2f ms/step" % (
      result["sequences"], result["tokens"], result["seconds"], result["tokens_per_s"],
      result["ms_per_step"]))
  return result


def table(results):
  """Markdown: per path, batch and model the median over rounds, and Switch/dense ratios."""
  lines = ["| path | batch | model | tokens/s (median) | tokens/s per round | ms/step (median) | "
           "time per token, switch / dense: of the medians; of the best rounds (per round) | "
           "load, 1 min |", "|---|---|---|---|---|---|---|---|"]
  keys = []
  for r in results:
    if (r["path"], r["batch_size"]) not in keys:
      keys.append((r["path"], r["batch_size"]))
  for path, batch_size in keys:
    runs = {m: sorted((r for r in results if (r["path"], r["batch_size"], r["model"]) ==
                       (path, batch_size, m)), key=lambda r: r["round"]) for m in MODELS}
    median = {m: statistics.median(r["tokens_per_s"] for r in runs[m]) for m in MODELS}
    for m in MODELS:
      ratio = ""
      if m == "switch_tiny":
        per_round = [d["tokens_per_s"] / s["tokens_per_s"]
                     for s, d in zip(runs["switch_tiny"], runs["t5_tiny"])]
        best = {k: max(r["tokens_per_s"] for r in runs[k]) for k in MODELS}
        ratio = "%.3f; %.3f (%s)" % (median["t5_tiny"] / median[m], best["t5_tiny"] / best[m],
                                     ", ".join("%.2f" % x for x in per_round))
      loads = [l for r in runs[m] for l in r["load"]]
      lines.append("| %s | %d | %s | %.1f | %s | %.2f | %s | %.1f-%.1f |" % (
          path, batch_size, m, median[m], ", ".join("%.0f" % r["tokens_per_s"] for r in runs[m]),
          statistics.median(r["ms_per_step"] for r in runs[m]), ratio, min(loads),
          max(loads)))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/decode_runs")
  parser.add_argument("--prompts", type=int, default=1024,
                      help="sequences measured at batch 16 (a power of two); batch 1 measures "
                      "a quarter as many")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  model_dirs = {m: train(m, workdir) for m in MODELS}
  for stale in glob.glob(os.path.join(workdir, "saved_model_*_export")):
    shutil.rmtree(stale)
  files = {}
  for batch_size in (1, 16):
    # the measured sequences follow one warm-up batch (start-up, first batch excluded)
    count = (args.prompts // 4 if batch_size == 1 else args.prompts) + batch_size
    files[batch_size] = os.path.join(workdir, "prompts_%d.txt" % count)
    with open(files[batch_size], "w", encoding="utf-8") as f:
      f.write("".join(p + "\n" for p in prompts(count)))
  log("uptime: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
  results = []
  measurements = [("binary", 1), ("binary", 16), ("saved_model", 1), ("saved_model", 16)]
  k = 0
  for round_index in range(args.rounds):
    for path, batch_size in measurements:
      for model in (MODELS if k % 2 == 0 else MODELS[::-1]):
        results.append(measure(path, model, model_dirs[model], batch_size, files[batch_size],
                               workdir, round_index))
      k += 1
  log("uptime: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print()
  print(table(results))


if __name__ == "__main__":
  main()

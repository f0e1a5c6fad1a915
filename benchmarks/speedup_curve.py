"""Issue 20: the Switch speedup as a function of training length, at CPU scale.

  python benchmarks/speedup_curve.py [--budget_minutes 150] [--parallel 2] [--workdir DIR] ...
      train (or continue) every run within the budget, evaluate its new checkpoints, then write
      the tables, the plots (benchmarks/speedup_curve/) and the RESULTS.md section
  python benchmarks/speedup_curve.py --report [--no_results]
      only the tables and plots, from the run directories
  python benchmarks/speedup_curve.py --pilot [--pilot_candidates mini-b16-rsqrt1k ...]
      the pilot: short dense runs of candidate widths, batches and learning-rate schedules
  python benchmarks/speedup_curve.py --data_stats
      lines, characters and tokens of each split (cached in WORKDIR/data_stats.json)

What runs. Through the stock t5_mesh_transformer, with gin/runs/speedup_cpu.gin: span corruption
on GCIDE plus the Linux kernel documentation (mtf_switch.tasks.domains: both train splits as one
corpus, a 4,096-piece vocabulary trained on both; 1% of GCIDE and 2% of kernel-docs held out),
Adafactor, batch --batch x 128 input tokens, --steps steps (16,000), a checkpoint every
--checkpoint_every steps (1,000). The runs, in this order (the first two answer the main
question alone):
  dense-s1        the dense twin (gin/models/t5_mini.gin at --width)
  switch-e32-s1   switch_mini with 32 experts at every other FFN (FLOP-matched: each expert is
                  the dense FFN's size, `python -m mtf_switch.count`), as are all Switch runs
  switch-e8-s1    8 experts
  dense-s2        the dense twin, seed 2 (initialisation, data order and training noise)
  switch-e32-s2   --second_seed_model, seed 2
  switch-e64-s1   only with --experts 8,32,64
Every Switch run has ST-MoE's router z-loss, SwitchFFN.router_z_loss_coef = 1e-3, on top of the
paper's defaults (balance loss 1e-2, capacity factor 1.25 / 2.0 in evaluation, init scale 0.1,
input jitter). Each run directory (WORKDIR/<run>) keeps run.json (its configuration), train.log
(one segment per process), eval.log and evals.json.

Resuming. Repeating the command continues every run from its latest checkpoint (a stopped
session loses at most one checkpoint interval); utils.run.skip_seen_data makes the resumed
process skip the batches already trained on, so it sees the data an uninterrupted run would.
--budget_minutes stops the session in time: a training process is stopped right after a
checkpoint when the next interval and the evaluation of its checkpoints would not fit before
the deadline (or, if an estimate was wrong, at the deadline), and every evaluation process at
the deadline. Runs train one after the other in the order above (--chunk_steps N: in slices of
N steps, always the least-trained run next, so that all runs advance together).

Two at a time. --parallel 2 runs two processes at once, each pinned to one core (`taskset -c
0` / `-c 1`) with one TensorFlow thread: the binary has no gin setting for TensorFlow's session
config (mesh-tensorflow builds the estimator's RunConfig with session_config=None off TPU), but
TensorFlow reads TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS when the session config leaves
them at 0, and sizes its pools (and tf.data's) by the cores it may run on; OMP_NUM_THREADS=1 as
well. --parallel 1 runs one unpinned process on both cores (--pin: pinned to core 0 with one
thread, to measure what a slot of --parallel 2 gets). Wall-clock curves are comparable only
between runs trained in the same mode; each log segment records its mode.

Evaluation. Every saved checkpoint (but step 0) is scored on both held-out splits with t5's
perplexity_eval (neg log perplexity of the targets: no auxiliary loss), the evaluation mixture
mtf_switch_gcide_kernel_eval, the same noise spans for every run and checkpoint
(mesh_eval_dataset_fn.seed = 1 whatever the run's seed), in batches of --eval_batch (64, for
speed: an evaluation process's cost is mostly one graph build per split and checkpoint; routing
groups stay at most 512 tokens, SwitchFFN.group_size); its Switch summaries give router
sharpness (top-1 gate, router entropy) and the dropped fraction at the evaluation capacity
factor (2.0). "both" is the mean over the target tokens of the two splits.

Report. For every evaluated step t of dense (the mean over its seeds; where seed 2 has not got
there yet, seed 1 alone), the first step at which each Switch model (likewise) reaches dense's
quality at t, linear between its
checkpoints (a step before the first evaluated checkpoint is not resolved: the speedup is then a
lower bound, marked >=); speedup = t / that step. A speedup counts only where the Switch model's
gap to dense at t exceeds the seed spread at t (the largest |seed 1 - seed 2| of the two models
trained with two seeds; "?" while there is no second seed). Also: quality vs steps and vs
wall clock, speedup vs t (PNG), dense's final slope in nats per doubling of steps (the gain in
neg log perplexity over its last doubling: 0 = flat), epochs seen, router sharpness and dropped
fraction over time (training: the summaries every 100 steps; evaluation: at cf 2.0).

Pilot (--pilot; the issue's item 1). Candidates are named WIDTH-bBATCH-SCHEDULE: widths mini
(d_model 64, GEGLU d_ff 128, 2 heads: t5_mini), w96 (96, 192, 3 heads), tiny (128, 256, 4 heads:
t5_tiny's width, 4+4 layers as all); schedules rsqrt10k (the paper's 1/sqrt(max(step, 10^4)):
1e-2 for 10k steps, then decaying), rsqrtNk (1e-2 until step N*1000, then 1e-2 *
sqrt(N*1000 / step)) and rsqrtNk-PEAK (PEAK instead of 1e-2, e.g. rsqrt10k-3e-3). Each trains
dense for --pilot_steps (2,400) with checkpoints every --pilot_checkpoint_every (600); the table
gives steps/s, held-out quality, the slope per doubling over the last two doublings and its
projection to --steps (the last slope times the ratio of the last two, once per further
doubling: a rough guide). Pick the configuration whose projected slope is small by --steps
while it still learns (the issue: the dense twin flattening within the budget), then run the
main command with --width/--batch/--lr. The pilots of 2026-12-02 (RESULTS.md): the paper's
constant 1e-2 diverges after ~1,000-1,500 steps at widths mini and w96, on this corpus and on
GCIDE alone (also at issue 6's own commit, and with float32 variables); rsqrt1k does not
diverge but stops learning after step ~500; a constant 3e-3 (rsqrt10k-3e-3, the paper's shape
at 0.3x its rate) learns throughout: it is the default --lr.

Budget, as measured in the main runs of 2026-12-07 (`--parallel 2 --budget_minutes 140`, a
fresh machine, nothing else running): pinned to one core with one thread, dense mini b16 7.7
steps/s, E8 6.2, E32 5.6; 16,000 steps take 35 / 43 / 48 min of training, and the 16
evaluations of a run 9-12 min more (its own process, after the training). The five runs the
issue requires (dense x2, E32 x2, E8) are ~290 core-minutes: one session of --parallel 2 trains
four of them to the end and the fifth (E32-s2) part of the way; repeating the command in the
same machine finishes it (run directories live in /tmp, so a new machine starts over).
(The first rates, on 2026-12-02 with 400-step runs on a loaded machine, were 2-3x lower: dense
3.05, E8 2.52, E32 1.65, E64 1.33 steps/s, w96 2.02, tiny 1.57; unpinned with TensorFlow's
threads dense ran at 2.51, slower than one pinned thread, so --parallel 2 about doubles the
model-hours. Other costs: 1-3.5 min from the command to checkpoint 0; skipping seen data on
resume ~46 batches/s on one core, ~6 min at step 16,000.) 16,000 steps
of 16 sequences are 2.3 epochs of the 15.4M train tokens (~111,500 examples per epoch);
--steps 13900 stays at 2.0 epochs. The pilot's default (3 candidates x 2,400 steps, 4
checkpoints each) took 34 min with --parallel 2 (quiet: mini 4.1 steps/s, w96 2.6 on one core).
"""
import argparse
import collections
import ctypes
import dataclasses
import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import reproduce  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import matplotlib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = reproduce.ROOT
BINARY = reproduce.BINARY
RUN_GIN = "gin/runs/speedup_cpu.gin"
DENSE_GIN = "gin/models/t5_mini.gin"
SWITCH_GIN = "gin/models/switch_mini.gin"
# mtf_switch.tasks.domains (not imported here: the driver stays light); tests check the names.
EVAL_MIXTURE = "mtf_switch_gcide_kernel_eval"
EVAL_TASKS = {"gcide": "mtf_switch_gcide_span_corruption",
              "kernel_docs": "mtf_switch_kernel_docs_span_corruption"}
DOMAINS = tuple(EVAL_TASKS)
EVAL_SEED = 1
Z_LOSS = 1e-3
INPUT_LENGTH = 128
RAW_TOKENS_PER_EXAMPLE = 141  # span corruption of 141 corpus tokens gives 128 input tokens
PLOTS = os.path.join(ROOT, "benchmarks", "speedup_curve")
BEGIN, END = "<!-- speedup_curve.py: begin -->", "<!-- speedup_curve.py: end -->"
PILOT_BEGIN, PILOT_END = "<!-- speedup_curve.py pilot: begin -->", "<!-- speedup_curve.py pilot: end -->"
# d_model, GEGLU d_ff (also each expert's), heads, d_kv
WIDTHS = {"mini": (64, 128, 2, 32), "w96": (96, 192, 3, 32), "tiny": (128, 256, 4, 32)}
PEAK_LR = 1e-2  # the plateau of the paper's schedule
SCHEDULE = r"rsqrt(\d+)k(?:-(\d+(?:\.\d+)?e-\d+))?"  # rsqrtNk[-PEAK]: N, PEAK
DEFAULT_RATE = 1.5  # steps/s assumed for a model not timed yet (the budget's estimates)
# The paper (arXiv 2101.03961v3, Sec. 3.2 and Fig. 4/5): Switch-Base with 64 experts reaches
# T5-Base's quality at step 450k at step 60k, and in one seventh of the time.
PAPER = {"steps": 7.5, "time": 7.0, "experts": 64, "dense_steps": 450000}


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
  """The recipe choices the pilot makes, and the checkpoint interval."""
  width: str = "mini"
  batch: int = 16
  lr: str = "rsqrt10k-3e-3"
  checkpoint_every: int = 1000

  @property
  def name(self):
    return "%s-b%d-%s" % (self.width, self.batch, self.lr)

  @staticmethod
  def parse(name, checkpoint_every):
    match = re.fullmatch(r"(\w+?)-b(\d+)-(%s)" % SCHEDULE, name)
    if not match or match.group(1) not in WIDTHS:
      raise ValueError("pilot candidate %r is not WIDTH-bBATCH-rsqrtNk[-PEAK] (widths: %s)"
                       % (name, ", ".join(WIDTHS)))
    return Config(match.group(1), int(match.group(2)), match.group(3), checkpoint_every)


def lr_params(lr):
  """Bindings of learning_rate_schedule_noam (pretrain_c4.gin's schedule) for rsqrtNk[-PEAK]:
  PEAK (default PEAK_LR, the paper's 1e-2) up to step N*1000, then PEAK * sqrt(N*1000 / step)."""
  match = re.fullmatch(SCHEDULE, lr)
  if not match:
    raise ValueError("--lr must be rsqrtNk or rsqrtNk-PEAK (e.g. rsqrt10k, the paper's, or "
                     "rsqrt10k-3e-3), got %r" % lr)
  warmup = int(match.group(1)) * 1000
  peak = float(match.group(2)) if match.group(2) else PEAK_LR
  if not 0 < peak <= 1:
    raise ValueError("--lr %r: the peak learning rate must be in (0, 1]" % lr)
  return ["learning_rate_schedule_noam.warmup_steps=%d" % warmup,
          "learning_rate_schedule_noam.multiplier=%r" % round(peak * math.sqrt(warmup), 6),
          "learning_rate_schedule_noam.linear_decay_fraction=0.0"]


def recipe_params(config):
  d_model, d_ff, heads, d_kv = WIDTHS[config.width]
  loop = math.gcd(config.checkpoint_every, 100)
  return (["d_model=%d" % d_model, "d_ff=%d" % d_ff, "num_heads=%d" % heads, "d_kv=%d" % d_kv,
           "utils.run.batch_size=('sequences_per_batch', %d)" % config.batch,
           "utils.run.save_checkpoints_steps=%d" % config.checkpoint_every,
           "utils.run.iterations_per_loop=%d" % loop] + lr_params(config.lr))


@dataclasses.dataclass
class Run:
  name: str
  model: str  # the run's model, seeds together: dense, switch-e32, ...
  model_gin: str
  params: list
  seed: int
  experts: int  # 0: dense
  config: Config
  steps: int
  workdir: str

  @property
  def model_dir(self):
    return os.path.join(self.workdir, self.name)

  def command(self, steps=None):
    return ([BINARY, "--module_import=mtf_switch", "--model_dir=" + self.model_dir,
             "--gin_file=" + self.model_gin, "--gin_file=" + RUN_GIN,
             "--gin_param=utils.run.train_steps=%d" % (steps or self.steps),
             "--gin_param=SEED=%d" % self.seed] +
            ["--gin_param=" + p for p in recipe_params(self.config) + self.params])

  def identity(self):
    """The command without its train_steps: a run may be extended with a larger --steps."""
    return " ".join(c for c in self.command() if not c.startswith("--gin_param=utils.run.train_steps"))


def switch_params(experts):
  return ["SwitchFFN.num_experts=%d" % experts, "SwitchFFN.router_z_loss_coef=%g" % Z_LOSS]


def main_runs(args):
  """The runs of the measurement, in training order."""
  config = Config(args.width, args.batch, args.lr, args.checkpoint_every)
  extra = list(args.gin_param)
  experts = sorted(int(e) for e in args.experts.split(","))

  def run(model, seed):
    if model == "dense":
      return Run("dense-s%d" % seed, model, DENSE_GIN, extra, seed, 0, config, args.steps,
                 args.workdir)
    match = re.fullmatch(r"switch-e(\d+)", model)
    if not match:
      sys.exit("--second_seed_model must be switch-eN, got %r" % model)
    e = int(match.group(1))
    return Run("%s-s%d" % (model, seed), model, SWITCH_GIN, switch_params(e) + extra, seed, e,
               config, args.steps, args.workdir)

  if args.second_seed_model != "dense" and _expert_count(args.second_seed_model) not in experts:
    sys.exit("--second_seed_model %s is not among --experts %s" % (args.second_seed_model,
                                                                  args.experts))
  first = [e for e in (32, 8) if e in experts] + [e for e in experts if e not in (8, 32)]
  out = [run("dense", 1), run("switch-e%d" % first[0], 1)]
  rest = ["switch-e%d" % e for e in first[1:] if e <= 32]
  out += [run(m, 1) for m in rest]
  out += [run("dense", 2), run(args.second_seed_model, 2)]
  out += [run("switch-e%d" % e, 1) for e in first[1:] if e > 32]
  if args.only:
    out = [r for r in out if r.name in args.only or r.model in args.only]
  return out


def pilot_runs(args):
  out = []
  for name in args.pilot_candidates:
    config = Config.parse(name, args.pilot_checkpoint_every)
    out.append(Run("pilot-" + name, "pilot-" + name, DENSE_GIN, list(args.gin_param), 1, 0,
                   config, args.pilot_steps, os.path.join(args.workdir, "pilot")))
  return out


# ---------------------------------------------------------------- data


def data_stats(workdir):
  """Lines, characters and tokens of each domain's splits with the shared vocabulary, and the
  span-corruption examples and target tokens of the held-out splits (computed once, cached)."""
  path = os.path.join(workdir, "data_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  import seqio  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import mtf_switch.tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from mtf_switch.tasks import domains  # pylint: disable=g-import-not-at-top
  assert (domains.EVAL_MIXTURE, domains.DOMAIN_TASKS) == (EVAL_MIXTURE, EVAL_TASKS)
  start = time.time()
  model = domains.model_file()
  sp = spm.SentencePieceProcessor(model_file=model)
  stats = {"vocabulary": model, "domains": {}}
  for name in DOMAINS:
    corpus = domains.domain_corpus((name,))
    stats["domains"][name] = {"file": corpus.files[0]}
    for split in ("train", "validation"):
      lines = corpus.lines(split)
      stats["domains"][name][split] = {
          "lines": len(lines), "chars": sum(map(len, lines)),
          "tokens": sum(map(len, sp.encode(lines)))}
    task = seqio.get_mixture_or_task(EVAL_TASKS[name])
    ds = task.get_dataset({"inputs": INPUT_LENGTH, "targets": 32}, split="validation",
                          shuffle=False, seed=EVAL_SEED)
    examples = targets = 0
    for ex in ds.as_numpy_iterator():
      examples += 1
      targets += int((ex["targets"] != 0).sum())
    stats["domains"][name]["validation"].update(examples=examples, target_tokens=targets)
  stats["seconds"] = time.time() - start
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(stats, f, indent=1)
  return stats


def examples_per_epoch(stats):
  """Span-corruption examples in one pass over both train splits (approximately: t5 concatenates
  128 lines at a time and cuts 141-token pieces, the last of each 128 short)."""
  return sum(d["train"]["tokens"] / RAW_TOKENS_PER_EXAMPLE + d["train"]["lines"] / 128
             for d in stats["domains"].values())


def eval_steps(stats, eval_batch):
  return math.ceil(max(d["validation"]["examples"] for d in stats["domains"].values())
                   / eval_batch)


def data_table(stats):
  out = ["| split | lines | characters | tokens | chars/token | span-corruption examples | "
         "target tokens |", "|---|---|---|---|---|---|---|"]
  total = collections.Counter()
  for name, d in stats["domains"].items():
    for split in ("train", "validation"):
      s = d[split]
      out.append("| %s %s | %s | %s | %s | %.2f | %s | %s |" % (
          name, split, "{:,}".format(s["lines"]), "{:,}".format(s["chars"]),
          "{:,}".format(s["tokens"]), s["chars"] / s["tokens"],
          "{:,}".format(s["examples"]) if "examples" in s else "~{:,.0f}".format(
              s["tokens"] / RAW_TOKENS_PER_EXAMPLE + s["lines"] / 128),
          "{:,}".format(s["target_tokens"]) if "target_tokens" in s else "-"))
      total[split] += s["tokens"]
  out.append("| both | | | train {:,}, validation {:,} | | | |".format(
      total["train"], total["validation"]))
  return "\n".join(out)


# ---------------------------------------------------------------- processes


class Budget:
  """The session's deadline and the estimates that decide what still fits."""

  def __init__(self, minutes, reserve_s=120):
    self.start = time.time()
    self.deadline = self.start + minutes * 60 - reserve_s if minutes else float("inf")
    self.stop = threading.Event()  # set when a slot found nothing more fits

  def left(self):
    return self.deadline - time.time()


_LIVE = set()  # processes started by this driver (terminated on exit)
_LIVE_LOCK = threading.Lock()


def _slot_env(slot):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  if slot.core is not None:
    env.update(TF_NUM_INTRAOP_THREADS=str(slot.threads), TF_NUM_INTEROP_THREADS=str(slot.threads),
               OMP_NUM_THREADS=str(slot.threads))
  return env


@dataclasses.dataclass
class Slot:
  core: int = None  # None: unpinned
  threads: int = 1

  def prefix(self):
    return [] if self.core is None else ["taskset", "-c", str(self.core)]

  def mode(self, parallel):
    return ("unpinned, TensorFlow's default threads, %d process(es) at a time" % parallel
            if self.core is None else "pinned to core %d, %d thread(s), %d process(es) at a time"
            % (self.core, self.threads, parallel))


def saved_steps(model_dir):
  """Steps of the complete checkpoints in model_dir: those with an index file up to the latest
  one model_dir/checkpoint names (it is rewritten after each save; with keep_checkpoint_max =
  None it names only the latest)."""
  try:
    with open(os.path.join(model_dir, "checkpoint")) as f:
      latest = re.search(r'^model_checkpoint_path: ".*?model\.ckpt-(\d+)"', f.read(), re.M)
  except FileNotFoundError:
    return []
  if not latest:
    return []
  steps = {int(m.group(1)) for m in (re.search(r"model\.ckpt-(\d+)\.index$", p) for p in
                                      os.listdir(model_dir)) if m}
  return sorted(s for s in steps if s <= int(latest.group(1)))


def _die_with_parent():
  """In the child: SIGTERM when the thread that started it ends (e.g. the driver is killed),
  so that no training outlives the session's driver."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def _start(cmd, slot, log_path, mode):
  log = open(log_path, "a")
  log.write(" ".join(cmd) + "\n# mode: %s; started %s\n" % (mode, time.strftime("%Y-%m-%d %H:%M:%S")))
  log.flush()
  proc = subprocess.Popen(slot.prefix() + cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          env=_slot_env(slot), preexec_fn=_die_with_parent)
  log.close()
  with _LIVE_LOCK:
    _LIVE.add(proc)
  return proc


def _end(proc, kill=False):
  if kill and proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
  rc = proc.wait()
  with _LIVE_LOCK:
    _LIVE.discard(proc)
  return rc


def terminate_all():
  with _LIVE_LOCK:
    procs = list(_LIVE)
  for p in procs:
    _end(p, kill=True)


class Timing:
  """Measured costs, kept in WORKDIR/timing.json for the next session's estimates."""

  DEFAULTS = {"train_start_s": 60.0, "eval_start_s": 60.0, "eval_checkpoint_s": 60.0}

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "timing.json")
    self.lock = threading.Lock()
    self.values = dict(self.DEFAULTS)
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.values.update(json.load(f))

  def get(self, key):
    with self.lock:
      return self.values.get(key, self.DEFAULTS.get(key))

  def update(self, key, value):
    with self.lock:
      old = self.values.get(key)
      self.values[key] = value if old is None or key not in self.DEFAULTS else 0.5 * (old + value)
      with open(self.path, "w") as f:
        json.dump(self.values, f, indent=1)


def check_run_dir(run):
  """Writes run.json, or refuses a run directory that holds another configuration."""
  os.makedirs(run.model_dir, exist_ok=True)
  path = os.path.join(run.model_dir, "run.json")
  identity = run.identity()
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old["identity"] != identity:
      sys.exit("%s holds a run of another configuration:\n  %s\nnot\n  %s\nUse another --workdir "
               "or delete that directory." % (run.model_dir, old["identity"], identity))
  with open(path, "w") as f:
    json.dump({"name": run.name, "identity": identity, "model": run.model, "seed": run.seed,
               "experts": run.experts, "config": dataclasses.asdict(run.config),
               "steps": run.steps}, f, indent=1)


def train(run, slot, target, budget, timing, parallel, pending_evals):
  """Trains run to `target` steps in one process; stops it right after a checkpoint when the
  next interval and the evaluation of the pending checkpoints no longer fit. Returns
  "done", "budget" or "failed"."""
  done = saved_steps(run.model_dir)
  last = done[-1] if done else 0
  interval = run.config.checkpoint_every
  rate = timing.get("rate/" + run.name) or timing.get("rate/" + run.model) or DEFAULT_RATE
  interval_s = interval / rate

  def eval_reserve(n):
    return timing.get("eval_start_s") + n * timing.get("eval_checkpoint_s") if n else 0.0

  if budget.left() < timing.get("train_start_s") + interval_s + eval_reserve(pending_evals + 1):
    return "budget"
  log_path = os.path.join(run.model_dir, "train.log")
  started = time.time()
  proc = _start(run.command(target), slot, log_path, slot.mode(parallel))
  seen, seen_at, new = last, None, 0  # checkpoints this process wrote
  reason = None
  while proc.poll() is None:
    time.sleep(2)
    steps = saved_steps(run.model_dir)
    if steps and steps[-1] > seen:
      now = time.time()
      new += 1
      if seen_at is None:  # the first new checkpoint: start-up, warm-up (and skipping) included
        timing.update("train_start_s", max(20.0, now - started - interval_s))
      else:  # the next interval will take about as long as this one
        interval_s = (now - seen_at) * interval / (steps[-1] - seen)
        timing.update("rate/" + run.name, interval / interval_s)
        timing.update("rate/" + run.model, interval / interval_s)
      seen, seen_at = steps[-1], now
      if (steps[-1] < target and
          budget.left() < interval_s * 1.1 + eval_reserve(pending_evals + new + 1)):
        reason = "budget"
        break
    if budget.left() < 0:
      reason = "budget"
      break
  rc = _end(proc, kill=reason is not None)
  if reason:
    return reason
  if rc:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    print("%s: training failed (exit %d), see %s:\n%s" % (run.name, rc, log_path, tail),
          flush=True)
    return "failed"
  return "done"


def eval_command(run, steps, eval_batch, n_steps):
  return run.command() + [
      "--gin_file=perplexity_eval.gin", "--gin_param=utils.run.dataset_split='validation'",
      "--gin_param=mesh_eval_dataset_fn.mixture_or_task_name=%r" % EVAL_MIXTURE,
      "--gin_param=mesh_eval_dataset_fn.seed=%d" % EVAL_SEED,
      "--gin_param=utils.run.batch_size=('sequences_per_batch', %d)" % eval_batch,
      "--gin_param=utils.run.perplexity_eval_steps=%d" % n_steps,
      "--gin_param=eval_checkpoint_step=%r" % list(steps)]


def eval_dir_name(domain, eval_batch, n_steps):
  return "eval_%s_validation_%d" % (EVAL_TASKS[domain], eval_batch * n_steps)


def scalars(events_dir):
  """{step: {tag: value}} of the numeric summaries in the event files of events_dir (a file cut
  short while being written: what was read)."""
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(events_dir, "events.out.tfevents.*"))):
    try:
      for event in tf.train.summary_iterator(path):
        for value in event.summary.value:
          if value.HasField("tensor"):
            x = tf.make_ndarray(value.tensor)
            if x.dtype.kind not in "fiu":  # e.g. the checkpoint_path string
              continue
            x = float(x)
          else:
            x = value.simple_value
          out.setdefault(event.step, {})[value.tag] = x
    except tf.errors.DataLossError:
      pass
  return out


def read_evals(run, eval_batch, n_steps):
  """{step: {domain: {metric: value}}} from the evaluation event files (every metric of the
  evaluation: neg_log_perplexity, loss, the Switch summaries switch/<layer>/<metric>)."""
  out = {}
  for domain in DOMAINS:
    events = scalars(os.path.join(run.model_dir, eval_dir_name(domain, eval_batch, n_steps)))
    for step, tags in events.items():
      out.setdefault(str(step), {})[domain] = tags
  return {s: v for s, v in out.items() if all(
      "neg_log_perplexity" in v.get(d, {}) for d in DOMAINS)}


def load_evals(run):
  path = os.path.join(run.model_dir, "evals.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def evaluate(run, slot, budget, timing, parallel, eval_batch, n_steps):
  """Scores the run's saved checkpoints not yet in evals.json (step 0 excepted) on both
  held-out splits; stopped at the deadline (what finished is kept). Returns the steps left."""
  evals = load_evals(run)
  todo = [s for s in saved_steps(run.model_dir) if s > 0 and str(s) not in evals]
  if not todo:
    return 0
  if budget.left() < timing.get("eval_start_s") + timing.get("eval_checkpoint_s"):
    return len(todo)
  started = time.time()
  proc = _start(eval_command(run, todo, eval_batch, n_steps), slot,
                os.path.join(run.model_dir, "eval.log"), slot.mode(parallel))
  killed = False
  while proc.poll() is None:
    time.sleep(2)
    if budget.left() < 0:
      killed = True
      break
  rc = _end(proc, kill=killed)
  evals.update(read_evals(run, eval_batch, n_steps))
  with open(os.path.join(run.model_dir, "evals.json"), "w") as f:
    json.dump(dict(sorted(evals.items(), key=lambda kv: int(kv[0]))), f, indent=1)
  finished = [s for s in todo if str(s) in evals]
  if finished and not killed:
    elapsed = time.time() - started
    # start-up is what one checkpoint's share does not explain; crude, refined every session
    per = timing.get("eval_checkpoint_s")
    start_s = max(10.0, elapsed - per * len(finished))
    if len(finished) > 1:
      per = max(5.0, (elapsed - timing.get("eval_start_s")) / len(finished))
    timing.update("eval_start_s", start_s)
    timing.update("eval_checkpoint_s", per)
  if rc and not killed:
    raise RuntimeError("evaluation failed (exit %d), see %s" % (
        rc, os.path.join(run.model_dir, "eval.log")))
  return len(todo) - len(finished)


def schedule(runs, args, slots, budget, timing, eval_batch, n_steps):
  """Runs the slots (threads) until every run is trained and evaluated or nothing fits."""
  lock = threading.Lock()
  busy, failed = set(), set()
  order = {r.name: i for i, r in enumerate(runs)}

  def next_run():
    with lock:
      todo = []
      for r in runs:
        if r.name in busy or r.name in failed:
          continue
        steps = saved_steps(r.model_dir)
        trained = steps[-1] if steps else 0
        pending = [s for s in steps if s > 0 and str(s) not in load_evals(r)]
        if trained < r.steps or pending:
          chunk = args.chunk_steps or r.steps
          todo.append(((trained // chunk if trained < r.steps else -1), order[r.name], r,
                       trained))
      if not todo:
        return None, 0
      _, _, r, trained = min(todo, key=lambda t: t[:2])
      busy.add(r.name)
      return r, trained

  def work(slot):
    while not budget.stop.is_set():
      run, trained = next_run()
      if run is None:
        return
      try:
        pending = len([s for s in saved_steps(run.model_dir)
                       if s > 0 and str(s) not in load_evals(run)])
        status = "done"
        if trained < run.steps:
          chunk = args.chunk_steps or run.steps
          target = min(run.steps, (trained // chunk + 1) * chunk)
          print("%s %s: training %d -> %d (%s)" % (time.strftime("%H:%M:%S"), run.name, trained,
                                                   target, slot.mode(len(slots))), flush=True)
          status = train(run, slot, target, budget, timing, len(slots), pending)
          if status == "failed":
            failed.add(run.name)
        left = evaluate(run, slot, budget, timing, len(slots), eval_batch, n_steps)
        steps = saved_steps(run.model_dir)
        print("%s %s: %s at step %d, %d checkpoint(s) left to evaluate" % (
            time.strftime("%H:%M:%S"), run.name, status, steps[-1] if steps else 0, left),
            flush=True)
        if status == "budget" or left:
          budget.stop.set()
      except Exception as e:  # pylint: disable=broad-except  (one run's failure stops only it)
        print("%s: %s: %r" % (run.name, type(e).__name__, e), flush=True)
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exc()
        failed.add(run.name)
      finally:
        with lock:
          busy.discard(run.name)

  threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in slots]
  for t in threads:
    t.start()
  for t in threads:
    while t.is_alive():
      t.join(1)


# ---------------------------------------------------------------- analysis


def wall_clock(run):
  """{checkpoint step: training seconds} from train.log: the intervals between a process's
  checkpoints as timed; a resumed process's first interval (which includes skipping the data
  already seen) at that process's median rate; steps no process timed at the overall rate."""
  path = os.path.join(run.model_dir, "train.log")
  if not os.path.exists(path):
    return {}, None
  with open(path) as f:
    log = f.read()
  segments = []
  for text in re.split(r"^%s .*$" % re.escape(BINARY), log, flags=re.M):
    saved = {}
    for m in re.finditer(reproduce._STAMP[:-2] + r".*Saving checkpoints for (\d+) into", text,  # pylint: disable=protected-access
                         re.M):
      saved.setdefault(int(m.group(6)), reproduce._seconds(m))  # pylint: disable=protected-access
    if saved:
      segments.append(saved)
  rates = []
  for saved in segments:
    steps = sorted(saved)
    rates += [(b - a) / (saved[b] - saved[a]) for a, b in zip(steps, steps[1:])][1:]
  if not rates:
    for saved in segments:
      steps = sorted(saved)
      rates += [(b - a) / (saved[b] - saved[a]) for a, b in zip(steps, steps[1:])]
  if not rates:
    return {}, None
  overall = statistics.median(rates)
  seconds = {0: 0.0}
  for saved in segments:
    steps = sorted(saved)
    seg_rates = [(b - a) / (saved[b] - saved[a]) for a, b in zip(steps, steps[1:])]
    seg_rate = statistics.median(seg_rates[1:]) if len(seg_rates) > 1 else overall
    for i, (a, b) in enumerate(zip(steps, steps[1:])):
      if a not in seconds:
        last = max(s for s in seconds if s < a)
        seconds[a] = seconds[last] + (a - last) / overall
      dt = (b - a) / seg_rate if (i == 0 and a > 0) else saved[b] - saved[a]
      seconds.setdefault(b, seconds[a] + dt)
  return seconds, overall


def load(runs, stats):
  """{run name: dict(run, steps, nlp {domain|"both": array}, seconds, rate, evals)}."""
  weights = {d: stats["domains"][d]["validation"]["target_tokens"] for d in DOMAINS}
  total = sum(weights.values())
  out = {}
  for run in runs:
    evals = load_evals(run)
    if not evals:
      continue
    steps = np.array(sorted(int(s) for s in evals))
    nlp = {d: np.array([evals[str(s)][d]["neg_log_perplexity"] for s in steps]) for d in DOMAINS}
    nlp["both"] = sum(nlp[d] * weights[d] for d in DOMAINS) / total
    seconds, rate = wall_clock(run)
    out[run.name] = dict(run=run, steps=steps, nlp=nlp, rate=rate, evals=evals,
                         seconds=np.array([seconds.get(int(s), np.nan) for s in steps]))
  return out


def models(loaded):
  """{model: {"steps", "seeds" (per step), "nlp" {metric: mean over the seeds evaluated at the
  step}, "spread" {metric: max - min over them, nan where one seed}, "runs"}} at the steps any
  seed of the model has evaluated (where seed 2 lags, the curve is seed 1's alone)."""
  by_model = collections.defaultdict(list)
  for r in loaded.values():
    by_model[r["run"].model].append(r)
  out = {}
  for model, rs in by_model.items():
    steps = sorted(set().union(*[set(r["steps"].tolist()) for r in rs]))
    out[model] = {"steps": np.array(steps), "nlp": {}, "spread": {},
                  "runs": [r["run"].name for r in rs]}
    for metric in DOMAINS + ("both",):
      values = np.full((len(rs), len(steps)), np.nan)
      for i, r in enumerate(rs):
        for s, v in zip(r["steps"], r["nlp"][metric]):
          values[i, steps.index(s)] = v
      count = np.sum(~np.isnan(values), 0)
      out[model]["seeds"] = count
      out[model]["nlp"][metric] = np.nanmean(values, 0)
      with np.errstate(invalid="ignore"):
        out[model]["spread"][metric] = np.where(count > 1, np.nanmax(values, 0)
                                                - np.nanmin(values, 0), np.nan)
  return out


def first_step(steps, nlp, target):
  """(first step at which the curve reaches target, linear between checkpoints; lower_bound):
  lower_bound when the first evaluated checkpoint is already there (the crossing is earlier, not
  resolved); (None, False) if never."""
  x = reproduce.first_crossing(steps, nlp, target)
  if x is None:
    return None, False
  return x, bool(nlp[0] >= target)


def seed_spread(by_model, metric, step):
  """The largest |seed 1 - seed 2| at `step` among the models with two seeds (None if none)."""
  spreads = []
  for m in by_model.values():
    if step in m["steps"]:
      spread = float(m["spread"][metric][list(m["steps"]).index(step)])
      if not math.isnan(spread):
        spreads.append(spread)
  return max(spreads) if spreads else None


def speedups(by_model, metric="both"):
  """{switch model: [row per dense step t]}: t, dense quality, the switch model's quality at t
  (if evaluated), gap, seed spread, first step reaching dense(t), speedup, lower bound,
  significant (gap > spread; None without a spread)."""
  dense = by_model.get("dense")
  if dense is None:
    return {}
  out = {}
  for model, m in sorted(by_model.items(), key=lambda kv: _expert_count(kv[0])):
    if model == "dense":
      continue
    rows = []
    for t, q in zip(dense["steps"], dense["nlp"][metric]):
      if t == 0:
        continue
      at = list(m["steps"]).index(t) if t in m["steps"] else None
      quality = float(m["nlp"][metric][at]) if at is not None else None
      reached, lower = first_step(m["steps"], m["nlp"][metric], q)
      spread = seed_spread(by_model, metric, t)
      gap = quality - q if quality is not None else None
      rows.append(dict(t=int(t), dense=float(q), quality=quality, gap=gap, spread=spread,
                       reached=reached, speedup=(t / reached) if reached else None, lower=lower,
                       significant=None if spread is None or gap is None else bool(gap > spread)))
    out[model] = rows
  return out


def _expert_count(model):
  match = re.search(r"e(\d+)", model)
  return int(match.group(1)) if match else 0


def slope_per_doubling(steps, nlp, end=None):
  """Change of nlp over the doubling of steps that ends at `end` (default the last step),
  linear in log2(step) between checkpoints; None if the curve does not reach back that far."""
  steps, nlp = np.asarray(steps, float), np.asarray(nlp, float)
  keep = steps > 0
  steps, nlp = steps[keep], nlp[keep]
  end = steps[-1] if end is None else end
  if len(steps) < 2 or end / 2 < steps[0]:
    return None
  x = np.log2(steps)
  return float(np.interp(np.log2(end), x, nlp) - np.interp(np.log2(end) - 1, x, nlp))


def routing(run):
  """Per evaluated step: mean over Switch layers and both splits (token-weighted by the split's
  tokens at the layer) of top1_gate, router_entropy and dropped_fraction at the evaluation
  capacity factor; and the training dropped fraction (summaries every 100 steps), averaged over
  the checkpoint interval ending at the step."""
  rows = {}
  for step, by_domain in sorted(run["evals"].items(), key=lambda kv: int(kv[0])):
    acc = collections.defaultdict(list)
    for metrics in by_domain.values():
      for tag, value in metrics.items():
        match = re.fullmatch(r"switch/(.+)/(top1_gate|router_entropy|dropped_fraction)", tag)
        if match:
          acc[match.group(2)].append(value)
    if acc:
      rows[int(step)] = {k: float(np.mean(v)) for k, v in acc.items()}
  try:
    from mtf_switch import report  # pylint: disable=g-import-not-at-top
    summaries = report.read_summaries(run["run"].model_dir)
  except (FileNotFoundError, ValueError):
    summaries = {}
  every = run["run"].config.checkpoint_every
  for step in rows:
    values = [v for layer in summaries.values() if "dropped_fraction" in layer
              for s, v in zip(*layer["dropped_fraction"]) if step - every < s <= step]
    rows[step]["train_dropped"] = float(np.mean(values)) if values else None
  return rows


def _aux_coefs(model_dir):
  """{stack: [c_B, c_z]} of SwitchFFN.loss_coef and router_z_loss_coef in the run's operative
  config (the binary records them per stack, encoder/SwitchFFN.loss_coef = 0.01; an unscoped
  binding is every stack's)."""
  with open(os.path.join(model_dir, "operative_config.gin")) as f:
    found = re.findall(r"^(?:(\w+)/)?SwitchFFN\.(loss_coef|router_z_loss_coef) = (\S+)$",
                       f.read(), re.M)
  unscoped = [0.0, 0.0]
  for stack, name, value in found:
    if not stack:
      unscoped[name == "router_z_loss_coef"] = float(value)
  coefs = collections.defaultdict(lambda: list(unscoped))
  for stack, name, value in found:
    if stack:
      coefs[stack][name == "router_z_loss_coef"] = float(value)
  return coefs


def training_loss(run):
  """{summary step: training cross-entropy}: the binary's `loss` summary (every 100 steps; one
  batch, per target position) less the Switch layers' auxiliary losses c_B L_B + c_z L_z (their
  summaries at the same step); {} without summaries."""
  from mtf_switch import metrics  # pylint: disable=g-import-not-at-top
  events = scalars(run.model_dir)
  loss = {step: tags["loss"] for step, tags in events.items() if "loss" in tags}
  if not run.experts:
    return loss
  coefs = _aux_coefs(run.model_dir)
  for step in loss:
    for tag, value in events[step].items():
      layer, metric = metrics.parse(tag) or (None, None)
      if metric in ("balance_loss", "z_loss"):
        loss[step] -= coefs[layer.split("/")[0]][metric == "z_loss"] * value
  return loss


def training_gaps(loaded):
  """{switch run: {checkpoint step: (training gap, held-out gap)}}: dense's cross-entropy (same
  seed: the same batches) minus the Switch run's, as the speedup table's gap (positive: Switch
  is better): in training, of the means over the checkpoint interval's summaries (their steps
  differ by a few between runs); held out, both splits."""
  out, losses = {}, {}  # losses: {run name: training_loss}, read once per run
  for name, r in loaded.items():
    dense = loaded.get("dense-s%d" % r["run"].seed)
    if not r["run"].experts or dense is None:
      continue
    every = r["run"].config.checkpoint_every
    for run in (r["run"], dense["run"]):
      if run.name not in losses:
        losses[run.name] = training_loss(run)
    mine, theirs = losses[r["run"].name], losses[dense["run"].name]
    rows = {}
    for step, nlp in zip(r["steps"], r["nlp"]["both"]):
      if step not in dense["steps"] or step == 0:
        continue
      means = [[v for s, v in curve.items() if step - every < s <= step]
               for curve in (theirs, mine)]
      held_out = float(nlp - dense["nlp"]["both"][list(dense["steps"]).index(step)])
      rows[int(step)] = (float(np.mean(means[0]) - np.mean(means[1])) if all(means) else None,
                         held_out)
    out[name] = rows
  return out


def _f(x, spec="%.3f", none="-"):
  return none if x is None or (isinstance(x, float) and math.isnan(x)) else spec % x


def _show_steps(steps, most=8):
  """At most `most` evaluated steps, log-spaced, always the last."""
  steps = [int(s) for s in steps if s > 0]
  if len(steps) <= most:
    return steps
  picks = {steps[-1]}
  for x in np.geomspace(steps[0], steps[-1], most):
    picks.add(min(steps, key=lambda s: abs(math.log(s) - math.log(x))))
  return sorted(picks)


def plot(loaded, by_model, table, out_dir=PLOTS, prefix=""):
  os.makedirs(out_dir, exist_ok=True)
  names = sorted(loaded, key=lambda n: (_expert_count(n), n))
  switch_models = sorted({loaded[n]["run"].model for n in names if loaded[n]["run"].experts},
                         key=_expert_count)
  palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:cyan", "tab:olive"]
  colors = dict(zip(switch_models, palette * 2))
  colors["dense"] = "black"
  paths = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, prefix + name), dpi=100)
    plt.close(fig)
    paths.append(prefix + name)

  for xkey, xlabel, fname in (("steps", "training step", "quality_vs_step.png"),
                              ("seconds", "training time (h, this machine)", "quality_vs_time.png")):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric in zip(axes, ("both",) + DOMAINS):
      for n in names:
        r = loaded[n]
        x = r[xkey] / (3600.0 if xkey == "seconds" else 1.0)
        keep = r["steps"] > 0
        ax.plot(x[keep], r["nlp"][metric][keep], marker="o", ms=2.5,
                ls="-" if r["run"].seed == 1 else "--", color=colors.get(r["run"].model),
                label="%s%s" % (r["run"].model, "" if r["run"].seed == 1 else " (seed %d)"
                                % r["run"].seed))
      ax.set_xlabel(xlabel)
      ax.set_title("held-out %s" % {"both": "GCIDE + kernel-docs (token-weighted)",
                                    "gcide": "GCIDE", "kernel_docs": "kernel-docs"}[metric],
                   fontsize=10)
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("neg log perplexity")
    axes[0].legend(fontsize=7)
    save(fig, fname)
  if table:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model, rows in table.items():
      rows = [r for r in rows if r["speedup"]]
      if not rows:
        continue
      t = [r["t"] for r in rows]
      ax.plot(t, [r["speedup"] for r in rows], "-", color=colors.get(model), label=model)
      for r in rows:
        ax.plot(r["t"], r["speedup"], "^" if r["lower"] else "o", color=colors.get(model),
                mfc=colors.get(model) if r["significant"] else "white", ms=6)
    ax.axhline(1, color="purple", lw=0.8, ls="--")
    ax.axhline(2, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("dense step t")
    ax.set_ylabel("speedup: t / first Switch step at dense(t)")
    ax.set_title("filled: gap > seed spread; hollow: not (or no 2nd seed); ^: lower bound",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "speedup_vs_step.png")
  routed = {n: routing(loaded[n]) for n in names if loaded[n]["run"].experts}
  if any(routed.values()):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n, rows in routed.items():
      if not rows:
        continue
      e = loaded[n]["run"].experts
      steps = sorted(rows)
      c = colors.get(loaded[n]["run"].model)
      ls = "-" if loaded[n]["run"].seed == 1 else "--"
      axes[0].plot(steps, [rows[s].get("top1_gate", np.nan) * e for s in steps], ls, color=c,
                   marker="o", ms=2.5, label=n)
      axes[1].plot(steps, [rows[s].get("router_entropy", np.nan) / math.log(e) for s in steps],
                   ls, color=c, marker="o", ms=2.5, label=n)
      axes[2].plot(steps, [np.nan if rows[s].get("train_dropped") is None
                           else rows[s]["train_dropped"] for s in steps], ls, color=c,
                   marker="o", ms=2.5, label=n + " (training, cf 1.25)")
      axes[2].plot(steps, [rows[s].get("dropped_fraction", np.nan) for s in steps], ":",
                   color=c, marker="x", ms=3, label=n + " (evaluation, cf 2.0)")
    axes[0].set_ylabel("mean top-1 gate x E (1 = uniform)")
    axes[1].set_ylabel("router entropy / ln E (1 = uniform)")
    axes[2].set_ylabel("dropped fraction")
    for ax in axes:
      ax.set_xlabel("training step")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    save(fig, "routing.png")
  return paths


def markdown(loaded, by_model, table, stats, args, plots, rel_plots):
  dense = by_model.get("dense")
  any_run = next(iter(loaded.values()))["run"]
  cfg = any_run.config
  per_epoch = examples_per_epoch(stats)
  out = [BEGIN, "",
         "`python benchmarks/speedup_curve.py --width %s --batch %d --lr %s --steps %d "
         "--checkpoint_every %d --experts %s --second_seed_model %s` (report of %s; run "
         "directories in WORKDIR). Every run: `%s`" % (
             cfg.width, cfg.batch, cfg.lr, any_run.steps, cfg.checkpoint_every, args.experts,
             args.second_seed_model, time.strftime("%Y-%m-%d"),
             " ".join(any_run.command()).replace(any_run.workdir, "WORKDIR")), ""]
  out += ["Data (shared 4,096-piece vocabulary, `mtf_switch.tasks.domains`):", "",
          data_table(stats), ""]
  out += ["| run | evaluated to step | epochs seen | steps/s | training h | mode |",
          "|---|---|---|---|---|---|"]
  for n in sorted(loaded, key=lambda n: (_expert_count(n), n)):
    r = loaded[n]
    last = int(r["steps"][-1])
    modes = []
    if os.path.exists(os.path.join(r["run"].model_dir, "train.log")):
      with open(os.path.join(r["run"].model_dir, "train.log")) as f:
        modes = sorted(set(re.findall(r"^# mode: ([^;]+);", f.read(), re.M)))
    out.append("| %s | %d | %.2f | %s | %s | %s |" % (
        n, last, last * r["run"].config.batch / per_epoch, _f(r["rate"], "%.2f"),
        _f(r["seconds"][-1] / 3600 if len(r["seconds"]) else None, "%.2f"), "; ".join(modes)))
  out += [""]
  for metric in ("both",) + DOMAINS:
    shown = _show_steps(dense["steps"] if dense else next(iter(by_model.values()))["steps"])
    out += ["Held-out neg log perplexity, %s (mean over seeds; seed spread in brackets):" % {
        "both": "both splits (token-weighted)", "gcide": "GCIDE",
        "kernel_docs": "kernel-docs"}[metric], "",
            "| model | seeds | " + " | ".join("step %d" % s for s in shown) + " |",
            "|---|---|" + "---|" * len(shown)]
    for model, m in sorted(by_model.items(), key=lambda kv: _expert_count(kv[0])):
      cells = []
      for s in shown:
        if s in m["steps"]:
          i = list(m["steps"]).index(s)
          spread = m["spread"][metric][i]
          cells.append("%.3f%s" % (m["nlp"][metric][i], "" if math.isnan(spread)
                                   else " (%.3f)" % spread))
        else:
          cells.append("")
      out.append("| %s | %d | %s |" % (model, max(m["seeds"]), " | ".join(cells)))
    out.append("")
  if table:
    out += ["Speedup (both splits): for each dense step t, the first step at which the Switch "
            "model reaches dense's quality at t (linear between checkpoints; >= where its first "
            "checkpoint is already better), t divided by it, and whether the gap at t exceeds "
            "the seed spread at t (yes / no / ? without a second seed):", "",
            "| t | dense | " + " | ".join("%s: step, speedup, gap, counts" % m for m in table)
            + " | spread |", "|---|---|" + "---|" * len(table) + "---|"]
    for i, row in enumerate(next(iter(table.values()))):
      cells = []
      for model, rows in table.items():
        r = rows[i]
        cells.append("%s, %s%s, %s, %s" % (
            _f(r["reached"], "%.0f", "not reached"), ">=" if r["lower"] else "",
            _f(r["speedup"], "%.2fx", "-"), _f(r["gap"], "%+.3f"),
            {True: "yes", False: "no", None: "?"}[r["significant"]]))
      out.append("| %d | %.3f | %s | %s |" % (row["t"], row["dense"], " | ".join(cells),
                                              _f(row["spread"])))
    out.append("")
  if dense is not None:
    slope = slope_per_doubling(dense["steps"], dense["nlp"]["both"])
    prev = slope_per_doubling(dense["steps"], dense["nlp"]["both"],
                              dense["steps"][-1] / 2) if slope is not None else None
    out += ["Dense's final slope (gain in neg log perplexity per doubling of steps; 0 = flat): "
            "%s over its last doubling (to step %d; the doubling before: %s), GCIDE %s, "
            "kernel-docs %s." % (
                _f(slope, "%+.3f"), dense["steps"][-1], _f(prev, "%+.3f"),
                _f(slope_per_doubling(dense["steps"], dense["nlp"]["gcide"]), "%+.3f"),
                _f(slope_per_doubling(dense["steps"], dense["nlp"]["kernel_docs"]), "%+.3f")),
            ""]
  routed = {n: routing(loaded[n]) for n in sorted(loaded, key=_expert_count)
            if loaded[n]["run"].experts}
  if any(routed.values()):
    out += ["Routing (evaluation, both splits, mean over the Switch layers): top-1 gate x E and "
            "router entropy / ln E (1 = uniform router), dropped fraction at the evaluation "
            "capacity factor 2.0 and in training (1.25, summaries of the checkpoint interval):",
            "", "| run | step | top-1 gate x E | entropy / ln E | dropped (eval) | dropped (train) |",
            "|---|---|---|---|---|---|"]
    for n, rows in routed.items():
      e = loaded[n]["run"].experts
      for s in _show_steps(sorted(rows), 5):
        r = rows[s]
        out.append("| %s | %d | %s | %s | %s | %s |" % (
            n, s, _f(r.get("top1_gate", np.nan) * e, "%.2f"),
            _f(r.get("router_entropy", np.nan) / math.log(e), "%.3f"),
            _f(r.get("dropped_fraction"), "%.3f"), _f(r.get("train_dropped"), "%.3f")))
    out.append("")
  gaps = training_gaps(loaded)
  if any(gaps.values()):
    shown = _show_steps(sorted(set().union(*[set(g) for g in gaps.values()])))
    out += ["Fitting against generalising: dense's cross-entropy minus the Switch run's (same "
            "seed, so the same batches; positive: Switch is better, as the gap above), in "
            "training (mean of the `loss` summaries of the checkpoint interval, every 100 "
            "steps, less the auxiliary losses; per target position, padding included) / on the "
            "held-out splits (both; per target token):",
            "", "| run | " + " | ".join("step %d" % s for s in shown) + " |",
            "|---|" + "---|" * len(shown)]
    for n, rows in sorted(gaps.items(), key=lambda kv: (_expert_count(kv[0]), kv[0])):
      out.append("| %s | %s |" % (n, " | ".join(
          "%s / %s" % (_f(rows[s][0], "%+.3f"), _f(rows[s][1], "%+.3f")) if s in rows else ""
          for s in shown)))
    out.append("")
  if table:
    out += ["At the last common step:", ""]
    for model, rows in table.items():
      done = [r for r in rows if r["quality"] is not None]
      if done:
        r = done[-1]
        out.append("- %s: step %d, gap %s, speedup %s%s (%s), seed spread %s" % (
            model, r["t"], _f(r["gap"], "%+.3f"), ">=" if r["lower"] else "",
            _f(r["speedup"], "%.2fx", "not reached"),
            "no second seed yet" if r["significant"] is None else "counts" if r["significant"]
            else "within the seed spread" if abs(r["gap"]) <= r["spread"]
            else "dense ahead by more than the seed spread", _f(r["spread"])))
    out += ["- Paper (Switch-Base, %d experts, T5-Base scale): %.1fx in steps (T5-Base's "
            "step-%dk quality at 60k), %.0fx in time." % (
                PAPER["experts"], PAPER["steps"], PAPER["dense_steps"] // 1000, PAPER["time"]),
            ""]
  out += ["![%s](%s)" % (p, os.path.join(rel_plots, p)) for p in plots]
  out += ["", END]
  return "\n".join(out)


def report(runs, args, stats, write=True):
  loaded = load(runs, stats)
  if not loaded:
    print("no evaluated checkpoints in %s yet" % args.workdir)
    return None
  by_model = models(loaded)
  table = speedups(by_model)
  plots = plot(loaded, by_model, table, args.plots_dir) if write else []
  section = markdown(loaded, by_model, table, stats, args, plots,
                     os.path.relpath(args.plots_dir, os.path.dirname(reproduce.RESULTS)))
  if write:
    reproduce.write_section(section, BEGIN, END,
                            "Speedup as a function of training length (issue 20)")
  print(section)
  return section


def pilot_report(runs, args, stats, write=True):
  loaded = load(runs, stats)
  if not loaded:
    print("no evaluated pilot checkpoints in %s yet" % args.workdir)
    return None
  out = [PILOT_BEGIN, "",
         "`python benchmarks/speedup_curve.py --pilot --pilot_steps %d --pilot_checkpoint_every "
         "%d --pilot_candidates %s` (%s): dense twin only, seed 1." % (
             args.pilot_steps, args.pilot_checkpoint_every, " ".join(args.pilot_candidates),
             time.strftime("%Y-%m-%d")), "",
         "| candidate | steps/s | step | both | GCIDE | kernel-docs | slope/doubling (last, before)"
         " | projected slope at step %d | projected steps in 150 min |" % args.steps,
         "|---|---|---|---|---|---|---|---|---|"]
  for n, r in loaded.items():
    s, both = r["steps"], r["nlp"]["both"]
    last = slope_per_doubling(s, both)
    prev = slope_per_doubling(s, both, s[-1] / 2) if last is not None else None
    projected = None
    if last is not None and prev:
      ratio = min(1.0, max(0.0, last / prev))
      projected = last * ratio ** max(0.0, math.log2(args.steps / s[-1]))
    out.append("| %s | %s | %d | %.3f | %.3f | %.3f | %s, %s | %s | %s |" % (
        n[len("pilot-"):], _f(r["rate"], "%.2f"), s[-1], both[-1], r["nlp"]["gcide"][-1],
        r["nlp"]["kernel_docs"][-1], _f(last, "%+.3f"), _f(prev, "%+.3f"),
        _f(projected, "%+.3f"), _f(r["rate"] * 150 * 60 if r["rate"] else None, "%.0f")))
  if write:
    plots = plot(loaded, models(loaded), {}, args.plots_dir, prefix="pilot_")
    rel = os.path.relpath(args.plots_dir, os.path.dirname(reproduce.RESULTS))
    out += [""] + ["![%s](%s)" % (p, os.path.join(rel, p)) for p in plots
                   if p.startswith("pilot_quality")]
  out += ["", PILOT_END]
  section = "\n".join(out)
  if write:
    reproduce.write_section(section, PILOT_BEGIN, PILOT_END, "Speedup curve: the pilot (issue 20)")
  print(section)
  return section


# ---------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/speedup",
                      help="run directories (outside the repository)")
  parser.add_argument("--steps", type=int, default=16000)
  parser.add_argument("--checkpoint_every", type=int, default=1000)
  parser.add_argument("--width", default="mini", choices=sorted(WIDTHS))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lr", default="rsqrt10k-3e-3",
                      help="the pilot's choice (the paper's rsqrt10k diverges here)")
  parser.add_argument("--experts", default="8,32", help="comma-separated; 64 trains last")
  parser.add_argument("--second_seed_model", default="switch-e32",
                      help="the Switch model trained with a second seed (dense always is)")
  parser.add_argument("--only", nargs="*", help="only these runs or models")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="an extra binding for every run (repeatable)")
  parser.add_argument("--budget_minutes", type=float, default=150,
                      help="stop the session before this (0: no limit); 2 min are kept for the "
                      "report")
  parser.add_argument("--parallel", type=int, default=1, choices=(1, 2),
                      help="processes at a time (2: each pinned to one core, one thread)")
  parser.add_argument("--pin", action="store_true",
                      help="with --parallel 1: pin to core 0 with one thread")
  parser.add_argument("--chunk_steps", type=int, default=0,
                      help="train in slices of this many steps, least-trained run first "
                      "(0: each run to the end, in order)")
  parser.add_argument("--eval_batch", type=int, default=64)
  parser.add_argument("--report", action="store_true", help="only the tables and plots")
  parser.add_argument("--no_results", action="store_true",
                      help="print the tables; do not write RESULTS.md or the plots")
  parser.add_argument("--plots_dir", default=PLOTS)
  parser.add_argument("--results_md", default=reproduce.RESULTS,
                      help="the file whose section between the markers is replaced")
  parser.add_argument("--data_stats", action="store_true")
  parser.add_argument("--pilot", action="store_true")
  # Batch 32 would be 4.6 epochs in 16,000 steps; widths above w96 are slower than E32 mini.
  parser.add_argument("--pilot_candidates", nargs="*", default=[
      "mini-b16-rsqrt10k", "mini-b16-rsqrt10k-3e-3", "mini-b16-rsqrt1k"])
  parser.add_argument("--pilot_steps", type=int, default=2400)
  parser.add_argument("--pilot_checkpoint_every", type=int, default=600)
  args = parser.parse_args(argv)
  budget = Budget(0 if args.report else args.budget_minutes)  # the session starts now
  args.workdir = os.path.abspath(args.workdir)
  if os.path.commonpath([args.workdir, ROOT]) == ROOT:
    sys.exit("--workdir %s is inside the repository: keep run directories outside it"
             % args.workdir)
  lr_params(args.lr)
  reproduce.RESULTS = os.path.abspath(args.results_md)  # write_section's file
  args.plots_dir = os.path.abspath(args.plots_dir)
  stats = data_stats(args.workdir)
  if args.data_stats:
    print(data_table(stats))
    print("examples per epoch (both train splits): ~%.0f; evaluation: %d batches of %d"
          % (examples_per_epoch(stats), eval_steps(stats, args.eval_batch), args.eval_batch))
    return
  runs = pilot_runs(args) if args.pilot else main_runs(args)
  if not args.report:
    for run in runs:
      check_run_dir(run)
    timing = Timing(args.workdir)
    slots = ([Slot(0), Slot(1)] if args.parallel == 2 else [Slot(0) if args.pin else Slot()])
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda *_: (terminate_all(), sys.exit("stopped")))
    try:
      schedule(runs, args, slots, budget, timing, args.eval_batch,
               eval_steps(stats, args.eval_batch))
    finally:
      terminate_all()
    print("session: %.1f min" % ((time.time() - budget.start) / 60), flush=True)
  (pilot_report if args.pilot else report)(runs, args, stats, write=not args.no_results)


if __name__ == "__main__":
  main()

"""The analysis of benchmarks/speedup_curve.py (issue 20) on synthetic run directories: which
checkpoints are complete, wall clock across resumed processes, the speedup at each dense step
and when it counts (the gap against the seed spread), dense's slope per doubling. No binary."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "speedup_curve", os.path.join(ROOT, "benchmarks", "speedup_curve.py"))
sc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)


def _run(tmp_path, name, model, seed, experts=0):
  config = sc.Config("mini", 16, "rsqrt10k", 10)
  run = sc.Run(name, model, sc.SWITCH_GIN if experts else sc.DENSE_GIN, [], seed, experts,
               config, 40, str(tmp_path))
  os.makedirs(run.model_dir, exist_ok=True)
  return run


def _saved(day_time, step, model_dir):
  return ("I1202 %s 1400 basic_session_run_hooks.py:632] Saving checkpoints for %d into "
          "%s/model.ckpt.\n" % (day_time, step, model_dir))


def test_saved_steps_are_the_complete_checkpoints(tmp_path):
  d = str(tmp_path)
  assert sc.saved_steps(d) == []
  for step in (0, 10, 20, 30):
    open(os.path.join(d, "model.ckpt-%d.index" % step), "w").close()
  # Checkpoint 30's index exists, but the state file (written after the save) names 20.
  with open(os.path.join(d, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "model.ckpt-20"\nall_model_checkpoint_paths: "model.ckpt-20"\n')
  assert sc.saved_steps(d) == [0, 10, 20]


def test_wall_clock_across_a_resumed_process(tmp_path):
  """Process 1 trains 0 -> 20 at 1 step/s (its first interval 15 s: warm-up); process 2 re-saves
  20, spends 50 s skipping seen data in its first interval, then trains at 1 step/s. The skip
  is not training time: that interval counts at process 2's median rate."""
  run = _run(tmp_path, "dense-s1", "dense", 1)
  d = run.model_dir
  log = (" ".join(run.command(20)) + "\n# mode: pinned\n" + _saved("01:00:00.0", 0, d)
         + _saved("01:00:15.0", 10, d) + _saved("01:00:25.0", 20, d)
         + " ".join(run.command(40)) + "\n# mode: pinned\n" + _saved("02:00:00.0", 20, d)
         + _saved("02:01:00.0", 30, d) + _saved("02:01:10.0", 40, d)
         + _saved("02:01:20.0", 50, d))
  with open(os.path.join(d, "train.log"), "w") as f:
    f.write(log)
  seconds, rate = sc.wall_clock(run)
  assert rate == 1.0
  assert seconds == {0: 0.0, 10: 15.0, 20: 25.0, 30: 35.0, 40: 45.0, 50: 55.0}


def _loaded(tmp_path, curves, stats):
  """Writes evals.json for {run name: (model, seed, experts, {step: nlp})} and loads them."""
  runs = []
  for name, (model, seed, experts, curve) in curves.items():
    run = _run(tmp_path, name, model, seed, experts)
    evals = {str(s): {d: {"neg_log_perplexity": v} for d in sc.DOMAINS} for s, v in curve.items()}
    with open(os.path.join(run.model_dir, "evals.json"), "w") as f:
      json.dump(evals, f)
    runs.append(run)
  return sc.load(runs, stats)


STATS = {"domains": {d: {"validation": {"target_tokens": 100}} for d in sc.DOMAINS}}


def test_speedup_is_t_over_the_first_switch_step_at_dense_quality(tmp_path):
  steps = [10, 20, 40]
  loaded = _loaded(tmp_path, {
      "dense-s1": ("dense", 1, 0, dict(zip(steps, [-5.0, -4.6, -4.4]))),
      "dense-s2": ("dense", 2, 0, dict(zip(steps, [-5.0, -4.62, -4.42]))),
      "switch-e8-s1": ("switch-e8", 1, 8, dict(zip(steps, [-4.9, -4.5, -4.3]))),
      "switch-e8-s2": ("switch-e8", 2, 8, dict(zip(steps, [-4.9, -4.5, -4.32]))),
      "switch-e32-s1": ("switch-e32", 1, 32, dict(zip(steps, [-5.1, -4.605, -4.2]))),
  }, STATS)
  by_model = sc.models(loaded)
  np.testing.assert_allclose(by_model["dense"]["nlp"]["both"], [-5.0, -4.61, -4.41])
  np.testing.assert_allclose(by_model["dense"]["spread"]["both"], [0.0, 0.02, 0.02], atol=1e-12)
  table = sc.speedups(by_model)
  e8 = {r["t"]: r for r in table["switch-e8"]}
  # dense(10) = -5.0: switch-e8's first checkpoint is already better: a lower bound.
  assert e8[10]["lower"] and e8[10]["speedup"] == 1.0
  # dense(20) = -4.61: e8 goes -4.9 -> -4.5 over steps 10-20, crossing at 10 + 10 * 0.29 / 0.4.
  np.testing.assert_allclose(e8[20]["reached"], 17.25)
  np.testing.assert_allclose(e8[20]["speedup"], 20 / 17.25)
  # Gap 0.10 at step 20 against a seed spread of 0.02 (both models have two seeds there).
  assert e8[20]["significant"] and np.isclose(e8[20]["spread"], 0.02)
  e32 = {r["t"]: r for r in table["switch-e32"]}
  # e32 is 0.005 ahead at step 20: under the spread, so its speedup does not count there.
  assert e32[20]["significant"] is False and e32[20]["speedup"] > 1
  assert e32[40]["significant"] and not e32[10]["significant"]


def test_a_model_never_reaching_dense_has_no_speedup_and_one_seed_no_verdict(tmp_path):
  loaded = _loaded(tmp_path, {
      "dense-s1": ("dense", 1, 0, {10: -5.0, 20: -4.5}),
      "switch-e8-s1": ("switch-e8", 1, 8, {10: -5.2, 20: -4.8}),
  }, STATS)
  rows = {r["t"]: r for r in sc.speedups(sc.models(loaded))["switch-e8"]}
  assert rows[20]["reached"] is None and rows[20]["speedup"] is None
  assert rows[20]["significant"] is None and rows[20]["spread"] is None


def test_slope_per_doubling():
  steps = np.array([0, 1000, 2000, 4000, 8000])
  nlp = np.array([-9.0, -5.0, -4.7, -4.5, -4.4])
  assert np.isclose(sc.slope_per_doubling(steps, nlp), 0.1)
  assert np.isclose(sc.slope_per_doubling(steps, nlp, 4000), 0.2)
  # Between checkpoints: linear in log2(step); 6000 -> 3000.
  x = np.log2([1000, 2000, 4000, 8000])
  want = (np.interp(np.log2(6000), x, nlp[1:]) - np.interp(np.log2(3000), x, nlp[1:]))
  assert -4.5 < np.interp(np.log2(6000), x, nlp[1:]) < -4.4
  assert np.isclose(sc.slope_per_doubling(steps, nlp, 6000), want)
  assert sc.slope_per_doubling(steps[:2], nlp[:2]) is None


def test_lr_schedules_peak_at_1e2_or_the_given_peak():
  params = dict(p.split("=") for p in sc.lr_params("rsqrt2k"))
  warmup = float(params["learning_rate_schedule_noam.warmup_steps"])
  multiplier = float(params["learning_rate_schedule_noam.multiplier"])
  assert warmup == 2000 and np.isclose(multiplier / np.sqrt(warmup), 1e-2)
  assert sc.lr_params("rsqrt10k")[1].endswith("=1.0")  # the paper's: 1/sqrt(max(step, 10^4))
  params = dict(p.split("=") for p in sc.lr_params("rsqrt10k-3e-3"))  # a lower peak
  assert np.isclose(float(params["learning_rate_schedule_noam.multiplier"]) / 100, 3e-3)
  assert sc.Config.parse("mini-b16-rsqrt10k-3e-3", 600).lr == "rsqrt10k-3e-3"
  for bad in ("rsqrt10k-3e3", "rsqrt10k-0e-3", "rsqrt10"):
    with pytest.raises(ValueError):
      sc.lr_params(bad)


def test_two_slots_take_the_runs_in_order_and_each_once(tmp_path, monkeypatch):
  """The scheduler (no binary): with --parallel 2 both slots work at once, the first two runs
  start first, no run is in two slots, and every run ends trained and evaluated; with
  --chunk_steps the least-trained run goes next."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  runs = [_run(tmp_path, n, n.rsplit("-s", 1)[0], int(n[-1]), 8 if "switch" in n else 0)
          for n in ("dense-s1", "switch-e32-s1", "switch-e8-s1", "dense-s2")]
  started, active, lock = [], set(), threading.Lock()

  def fake_train(run, slot, target, budget, timing, parallel, pending):
    with lock:
      assert run.name not in active
      active.add(run.name)
      started.append((run.name, target, slot.core))
    time.sleep(0.05)
    for step in range(0, target + 1, run.config.checkpoint_every):
      open(os.path.join(run.model_dir, "model.ckpt-%d.index" % step), "w").close()
    with open(os.path.join(run.model_dir, "checkpoint"), "w") as f:
      f.write('model_checkpoint_path: "model.ckpt-%d"\n' % target)
    with lock:
      active.discard(run.name)
    return "done"

  def fake_evaluate(run, slot, budget, timing, parallel, eval_batch, n_steps):
    evals = sc.load_evals(run)
    evals.update({str(s): {} for s in sc.saved_steps(run.model_dir) if s > 0})
    with open(os.path.join(run.model_dir, "evals.json"), "w") as f:
      json.dump(evals, f)
    return 0

  monkeypatch.setattr(sc, "train", fake_train)
  monkeypatch.setattr(sc, "evaluate", fake_evaluate)
  args = type("Args", (), {"chunk_steps": 0})()
  slots = [sc.Slot(0), sc.Slot(1)]
  sc.schedule(runs, args, slots, sc.Budget(0), None, 64, 14)
  assert {n for n, _, _ in started[:2]} == {"dense-s1", "switch-e32-s1"}
  assert sorted(n for n, _, _ in started) == sorted(r.name for r in runs)  # each once
  assert {core for _, _, core in started} == {0, 1}
  for run in runs:
    assert sc.saved_steps(run.model_dir)[-1] == 40 and len(sc.load_evals(run)) == 4
  # In slices of 20 steps: every run gets to 20 before any goes on to 40.
  for run in runs:
    os.remove(os.path.join(run.model_dir, "evals.json"))
    with open(os.path.join(run.model_dir, "checkpoint"), "w") as f:
      f.write('model_checkpoint_path: "model.ckpt-0"\n')
  started.clear()
  args.chunk_steps = 20
  sc.schedule(runs, args, [sc.Slot()], sc.Budget(0), None, 64, 14)
  assert [t for _, t, _ in started] == [20, 20, 20, 20, 40, 40, 40, 40]


def _write_summaries(model_dir, points):
  """An event file of scalar summaries {step: {tag: value}}, as the binary writes them (records
  of Event protos: no summary API, so graph or eager mode does not matter)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, "events.out.tfevents.0.test")
  with tf.io.TFRecordWriter(path) as writer:
    for step, tags in points.items():
      summary = tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag=t, simple_value=v)
                                            for t, v in tags.items()])
      writer.write(tf.compat.v1.Event(step=step, summary=summary).SerializeToString())


def test_training_gap_subtracts_the_auxiliary_losses_per_stack(tmp_path):
  """Switch's `loss` summary holds c_B L_B + c_z L_z of every Switch layer on top of the
  cross-entropy; the gap to dense (same seed) is taken on the cross-entropy alone, averaged over
  the checkpoint interval (dense's summaries at steps 5, 10, 15, 20, Switch's at 4, 9, 14, 19:
  a checkpoint shifts the binary's summary steps)."""
  loaded = _loaded(tmp_path, {
      "dense-s1": ("dense", 1, 0, {10: -5.0, 20: -4.6}),
      "switch-e8-s1": ("switch-e8", 1, 8, {10: -4.9, 20: -4.7}),
  }, STATS)
  enc, dec = "switch/encoder/block_000/layer_002", "switch/decoder/block_000/layer_005"
  switch_dir = loaded["switch-e8-s1"]["run"].model_dir
  with open(os.path.join(switch_dir, "operative_config.gin"), "w") as f:
    f.write("decoder/SwitchFFN.loss_coef = 0.02\nencoder/SwitchFFN.loss_coef = 0.01\n"
            "SwitchFFN.router_z_loss_coef = 0.001\n")
  dense_ce = {5: 5.2, 10: 5.0, 15: 4.8, 20: 4.7}
  switch_ce = {4: 5.1, 9: 4.9, 14: 4.7, 19: 4.6}
  aux = {enc: (1.5, 10.0), dec: (2.0, 20.0)}  # (L_B, L_z) at every step
  total_aux = 0.01 * 1.5 + 0.001 * 10.0 + 0.02 * 2.0 + 0.001 * 20.0
  _write_summaries(loaded["dense-s1"]["run"].model_dir, {s: {"loss": v} for s, v in dense_ce.items()})
  _write_summaries(switch_dir, {s: dict(
      [("loss", v + total_aux)]
      + [("%s/%s" % (layer, term), value) for layer, terms in aux.items()
         for term, value in zip(("balance_loss", "z_loss"), terms)]) for s, v in switch_ce.items()})
  ce = sc.training_loss(loaded["switch-e8-s1"]["run"])
  np.testing.assert_allclose([ce[s] for s in sorted(ce)], [switch_ce[s] for s in sorted(ce)],
                             atol=1e-6)
  gaps = sc.training_gaps(loaded)["switch-e8-s1"]
  np.testing.assert_allclose(gaps[10], (0.1, 0.1), atol=1e-6)  # better in both
  np.testing.assert_allclose(gaps[20], (0.1, -0.1), atol=1e-6)  # fits better, generalises worse

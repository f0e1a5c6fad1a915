"""python -m mtf_switch.report: reading the Switch routing summaries from event files (scalar
and TPU host-call tensor summaries), the plots and report.md, the error messages, and one real
t5_mesh_transformer run."""
import os
import re

import binary
import matplotlib.image
import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import report

STEPS = (1, 101, 201)
NUM_EXPERTS = 4
# Written out of order: read_summaries orders encoder before decoder, then block/layer numbers.
LAYERS = ("decoder/block_000/layer_005", "encoder/block_010/layer_003",
          "encoder/block_002/layer_003")
ORDERED = ("encoder/block_002/layer_003", "encoder/block_010/layer_003",
           "decoder/block_000/layer_005")
OTHER = ("router_entropy", "top1_gate", "balance_loss", "z_loss")
PNGS = ("expert_load_heatmap.png", "dropped_fraction.png", "aux_losses.png")


def known_values():
  """{layer: {metric: float32 [steps]}}: expert fractions on a 1/1024 grid, the rest drawn."""
  rng = np.random.RandomState(0)
  values = {}
  for layer in LAYERS:
    fractions = np.round(rng.dirichlet(np.ones(NUM_EXPERTS) * 0.7, len(STEPS))
                         * rng.uniform(0.8, 1.0, (len(STEPS), 1)) * 1024) / 1024
    v = {"expert_fraction/%d" % i: fractions[:, i] for i in range(NUM_EXPERTS)}
    v["dropped_fraction"] = 1 - fractions.sum(1)
    v["unrouted_fraction"] = v["dropped_fraction"] * 0.5
    v.update({name: rng.uniform(0.1, 3.0, len(STEPS)) for name in OTHER})
    values[layer] = {k: x.astype(np.float32) for k, x in v.items()}
  return values


def write_events(events_dir, values, tensor=False, extra=("loss",)):
  """Event files with values[layer][metric][k] at STEPS[k] as tags switch/<layer>/<metric>, as
  the estimator writes them (simple_value) or as the TPU host call does (tensor), and a loss."""
  os.makedirs(str(events_dir), exist_ok=True)
  with tf.Graph().as_default():
    writer = tf.summary.FileWriter(str(events_dir))
    for k, step in enumerate(STEPS):
      tagged = [("switch/%s/%s" % (layer, m), x[k]) for layer, v in values.items()
                for m, x in v.items()] + [(tag, 5.0 - k) for tag in extra]
      summary_values = [
          tf.Summary.Value(tag=tag, tensor=tf.make_tensor_proto(np.float32(x))) if tensor
          else tf.Summary.Value(tag=tag, simple_value=x) for tag, x in tagged]
      writer.add_summary(tf.Summary(value=summary_values), step)
    writer.close()


def assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 150 and image.shape[1] > 300, image.shape
  assert image[..., :3].std() > 0.05  # not blank


def expected_rows(values):
  """The report.md row of each layer at the last step, computed from the written values."""
  rows = {}
  for layer, v in values.items():
    f = np.array([v["expert_fraction/%d" % i][-1] for i in range(NUM_EXPERTS)], np.float64)
    dropped = float(v["dropped_fraction"][-1])
    mean = (1 - dropped) / NUM_EXPERTS
    rows[layer] = (f.argmax(), f.max(), f.argmin(), f.min(), f.max() / mean, dropped,
                   v["router_entropy"][-1], v["top1_gate"][-1])
  return rows


@pytest.mark.parametrize("tensor", [False, True], ids=["scalar", "tpu_tensor"])
def test_reads_exactly_the_written_values(tmp_path, tensor):
  values = known_values()
  write_events(tmp_path, values, tensor=tensor)
  summaries = report.read_summaries(str(tmp_path))
  assert tuple(summaries) == ORDERED
  for layer in LAYERS:
    assert set(summaries[layer]) == set(values[layer])
    for metric, expected in values[layer].items():
      steps, got = summaries[layer][metric]
      np.testing.assert_array_equal(steps, STEPS)
      np.testing.assert_array_equal(got, expected)


def test_report_files_and_numbers(tmp_path):
  values = known_values()
  write_events(tmp_path / "model", values)
  out = tmp_path / "out"
  paths = report.write_report(report.read_summaries(str(tmp_path / "model")), str(out))
  rows = expected_rows(values)
  most_imbalanced = max(rows, key=lambda layer: rows[layer][4])
  layer_png = "expert_load_%s.png" % most_imbalanced.replace("/", "_")
  assert sorted(os.path.basename(p) for p in paths) == sorted(PNGS + (layer_png, "report.md"))
  for name in PNGS + (layer_png,):
    assert_png(str(out / name))
  text = (out / "report.md").read_text()
  assert "at step 201" in text
  for layer, (most, fmost, least, fleast, imbalance, dropped, entropy, gate) in rows.items():
    row = "| %s | %d (%.4f) | %d (%.4f) | %.3f | %.4f | %.3f | %.3f |" % (
        layer, most, fmost, least, fleast, imbalance, dropped, entropy, gate)
    assert row in text, (row, text)
  assert text.index(ORDERED[0]) < text.index(ORDERED[1]) < text.index(ORDERED[2] + " |")
  assert "mean_i f_i = (1 - dropped fraction) / E" in text
  for name in PNGS + (layer_png,):
    assert "](%s)" % name in text  # relative links


def test_main_layer_and_events_subdir(tmp_path, capsys):
  write_events(tmp_path / "model" / "validation_eval", known_values(), tensor=True)
  out = tmp_path / "out"
  report.main(["--model_dir", str(tmp_path / "model"), "--events_subdir", "validation_eval",
               "--out", str(out), "--layer", "encoder/block_010/layer_003"])
  assert_png(str(out / "expert_load_encoder_block_010_layer_003.png"))
  assert str(out / "report.md") in capsys.readouterr().out


def error_of(*argv):
  with pytest.raises(SystemExit) as e:
    report.main(list(argv))
  assert isinstance(e.value.code, str), e.value.code  # a message: exit status 1, no traceback
  return e.value.code


def test_errors_say_what_is_missing(tmp_path):
  empty, out = tmp_path / "empty", str(tmp_path / "out")
  empty.mkdir()
  message = error_of("--model_dir", str(empty), "--out", out)
  assert "no TensorBoard event files (events.out.tfevents.*) in %s" % empty in message
  message = error_of("--model_dir", str(tmp_path / "missing"), "--out", out)
  assert "missing is not a directory" in message

  write_events(empty / "validation_eval", {}, extra=("loss",))
  message = error_of("--model_dir", str(empty), "--out", out)
  assert "for --events_subdir: validation_eval" in message

  only_loss = tmp_path / "only_loss"
  write_events(only_loss, {}, extra=("loss", "learning_rate"))
  message = error_of("--model_dir", str(only_loss), "--out", out)
  assert message.startswith("mtf_switch.report: error: no Switch routing summaries "
                            "(switch/<layer>/<metric>) in the event files of %s" % only_loss)
  assert "tags found: learning_rate, loss" in message
  assert "SwitchFFN.summaries = True" in message and "every 100 steps" in message

  write_events(tmp_path / "model", known_values())
  message = error_of("--model_dir", str(tmp_path / "model"), "--out", out, "--layer", "moe")
  assert message.endswith("no Switch layer 'moe' in the summaries; available layers: "
                          + ", ".join(ORDERED))
  assert not os.path.exists(out)


def test_real_run_training_and_evaluation_summaries(pretrained_switch, tmp_path):
  """The session's 40-step run has the training summaries of its first step (0 or 1: the
  global step read in that run); a perplexity eval records the same metrics, weighted over its
  batches, in its eval directory. Both feed the report."""
  env, model_dir, _ = pretrained_switch
  training = report.read_summaries(str(model_dir))
  assert list(training) == ["encoder/block_000/layer_003", "decoder/block_000/layer_005"]
  log = binary.run(env, model_dir, "--gin_file=" + binary.SWITCH_GIN,
                   "--gin_file=gin/runs/pretrain_cpu.gin", "--gin_file=perplexity_eval.gin",
                   "--gin_param=eval_checkpoint_step=-1",
                   "--gin_param=utils.run.dataset_split='validation'",
                   *["--gin_param=" + p for p in binary.SMALL]).stderr
  eval_dir, = [d.name for d in model_dir.iterdir() if d.name.startswith("eval_")]
  evaluation = report.read_summaries(str(model_dir / eval_dir))
  assert list(evaluation) == list(training)
  eval_tokens = float(re.search(r"num_eval_tokens = ([0-9.]+)", log).group(1))
  for summaries, step in ((training, (0, 1)), (evaluation, (40,))):
    for layer, m in summaries.items():
      assert set(m) == {"expert_fraction/%d" % i for i in range(8)} | {
          "dropped_fraction", "unrouted_fraction", "multi_expert_fraction", "tokens"} | set(OTHER)
      (steps, _), = {(tuple(s), 0) for s, _ in m.values()}
      assert len(steps) == 1 and steps[0] in step
      fractions = sum(m["expert_fraction/%d" % i][1] for i in range(8))
      np.testing.assert_allclose(fractions, 1 - m["dropped_fraction"][1], atol=1e-5)
      np.testing.assert_allclose(m["unrouted_fraction"][1], m["dropped_fraction"][1], atol=1e-6)
      assert np.all(m["multi_expert_fraction"][1] == 0)  # top-1
      assert np.all(m["router_entropy"][1] <= np.log(8) + 1e-5)
      assert np.all((m["top1_gate"][1] >= 1 / 8) & (m["top1_gate"][1] <= 1))
  # the decoder routes exactly the eval's target tokens
  assert evaluation["decoder/block_000/layer_005"]["tokens"][1][0] == eval_tokens
  for events_dir, args in ((model_dir, []), (model_dir / eval_dir, ["--events_subdir", eval_dir])):
    out = tmp_path / events_dir.name
    report.main(["--model_dir", str(model_dir), "--out", str(out)] + args)
    for name in PNGS:
      assert_png(str(out / name))
    text = (out / "report.md").read_text()
    assert len(re.findall(r"^\| (en|de)coder/block_000/layer_00[35] \|", text, re.M)) == 2

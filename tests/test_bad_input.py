"""Bad input gets a clear error, early (issue 23): one test per input a new user may get wrong.
Each error must name the setting and what to do; the seconds until it appears are printed
(`pytest -s`). Through the binary they are mostly TensorFlow's import (about 12 s)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

from mesh_tensorflow.transformer import transformer
import numpy as np
import pytest

import binary
from conftest import run_switch
from mtf_switch import experts
from mtf_switch import guards
from mtf_switch import layers
from mtf_switch.tasks import corpus as corpus_lib

SMALL_RUN = ["--gin_file=" + binary.SWITCH_GIN, "--gin_file=gin/runs/pretrain_cpu.gin"] + [
    "--gin_param=" + p for p in binary.SMALL + ("utils.run.train_steps=1",)]


def timed(what, fn, *args, **kwargs):
  """fn(*args, **kwargs) must raise; returns the exception, printing the seconds to it."""
  start = time.time()
  with pytest.raises(Exception) as info:
    fn(*args, **kwargs)
  print("\n%s: %.3f s: %s" % (what, time.time() - start, info.value))
  return info.value


# ---------------------------------------------------------------- failing binary runs


@pytest.fixture(scope="module")
def failing_runs(pretrained_switch, tmp_path_factory):
  """One binary run per bad input (small model, one step, the session's warm cache), all
  started at once: {name: (exit code, seconds to exit, log)}. The "lock" run trains into a
  directory whose training lock this process holds."""
  env, _, _ = pretrained_switch
  work = tmp_path_factory.mktemp("bad_input")
  noise = work / "noise.txt"
  noise.write_bytes(np.random.RandomState(0).bytes(20000))
  locked = work / "locked"
  handle = guards.lock_model_dir(str(locked))
  runs = {
      "hidden_size": ["--gin_param=SwitchFFN.hidden_size=0"],
      "corpus": ["--gin_param=mtf_switch.tasks.text_files.paths=[%r]" % str(noise)],
      "layout": ["--gin_file=gin/layouts/expert_parallel.gin",
                 "--gin_param=SwitchFFN.num_experts=6"],
      "lock": [],
  }
  started, procs = time.time(), {}
  try:
    for name, flags in runs.items():
      model_dir = locked if name == "lock" else work / name
      procs[name] = binary.start(env, str(work), name, binary.BINARY,
                                 "--module_import=mtf_switch", "--model_dir=%s" % model_dir,
                                 *SMALL_RUN, *flags)
    results = {}
    while len(results) < len(procs):
      for name, (proc, log) in procs.items():
        if name not in results and proc.poll() is not None:
          with open(log) as f:
            results[name] = (proc.returncode, time.time() - started, f.read())
      time.sleep(0.2)
  finally:
    for proc, _ in procs.values():
      if proc.poll() is None:
        proc.kill()
    guards.unlock_model_dir(handle)
  for name, (code, seconds, log) in results.items():
    print("\nbinary run %s: exit %d after %.1f s (4 runs at once); last line: %s" % (
        name, code, seconds, log.strip().splitlines()[-1][:300]))
  return results


def failed_with(failing_runs, name, error):
  code, _, log = failing_runs[name]
  assert code != 0, log[-3000:]
  lines = [l for l in log.splitlines() if l.startswith(error + ":") or
           l.startswith("mtf_switch.guards." + error + ":")]
  assert lines, log[-3000:]
  assert "Calling model_fn" not in log  # before the graph is built
  return lines[-1]


# ---------------------------------------------------------------- 1. SwitchFFN's arguments

BAD_ARGUMENTS = [
    (dict(capacity_factor_train=-1), "capacity_factor_train must be a number >= 0"),
    (dict(capacity_factor_eval=-0.5), "capacity_factor_eval must be a number >= 0"),
    (dict(capacity_factor_train=float("nan")), "capacity_factor_train must be a number >= 0"),
    (dict(hidden_size=0), "hidden_size must be an integer >= 1"),
    (dict(hidden_size=2.5), "hidden_size must be an integer >= 1"),
    (dict(group_size=0), "group_size must be an integer >= 1"),
    (dict(num_experts=0), "num_experts must be an integer >= 1"),
    (dict(min_capacity=-1), "min_capacity must be an integer >= 0"),
    (dict(jitter_eps=1.0), r"jitter_eps must be a number in \[0, 1\)"),
    (dict(router_dropout_rate=-0.1), r"router_dropout_rate must be a number in \[0, 1\)"),
    (dict(expert_dropout_rate=1.0), r"expert_dropout_rate must be a number in \[0, 1\)"),
    (dict(loss_coef=-1e-2), "loss_coef must be a number >= 0"),
    (dict(router_z_loss_coef="1e-3"), "router_z_loss_coef must be a number >= 0"),
    (dict(init_scale=0.0), "init_scale must be a number > 0"),
    (dict(num_selected_experts=0), "num_selected_experts must be an integer >= 1"),
    (dict(second_threshold=0.0), r"second_threshold must be a number in \(0, 1\]"),
    (dict(no_token_left_behind=-1), "no_token_left_behind must be an integer >= 0"),
    (dict(summaries="False"), "summaries must be True or False"),
    (dict(multiplicative_bias=2), "multiplicative_bias must be True or False"),
    (dict(activation="foo"), "activation='foo': 'foo' is not an activation; use one of elu, "
                             "gelu, leaky_relu, linear, relu"),
    (dict(activation=["gelu", "lineer"]), "'lineer' is not an activation"),
    (dict(activation=[]), "no activation"),
    (dict(router="experts_choose"), "Unknown SwitchFFN.router 'experts_choose'; choose one of "
                                    "top_k, switch_max, expert_choice"),
    (dict(expert_choice_softmax="group"), "Unknown SwitchFFN.expert_choice_softmax 'group'"),
    (dict(router="switch_max", num_selected_experts=2), "router='switch_max' is top-1"),
    (dict(router="expert_choice", dropless_train=True),
     "router='expert_choice' drops no token.*unset SwitchFFN.dropless_train"),
]


@pytest.mark.parametrize("kwargs,match", BAD_ARGUMENTS, ids=[
    "%s=%r" % next(iter(k.items())) for k, _ in BAD_ARGUMENTS])
def test_switch_arguments_out_of_range_are_refused(kwargs, match):
  """Every numeric argument's range, booleans and every activation name, in the constructor
  (the binary builds the layers when it creates its estimator, before any graph)."""
  error = timed("SwitchFFN(%s)" % kwargs, layers.SwitchFFN, **kwargs)
  assert isinstance(error, ValueError)
  assert "SwitchFFN." in str(error)
  assert re.search(match, str(error)), str(error)


def test_switch_argument_edges_are_accepted():
  layers.SwitchFFN(capacity_factor_train=0.0, capacity_factor_eval=0, min_capacity=0,
                   jitter_eps=0.0, router_dropout_rate=0.0, loss_coef=0, second_threshold=1.0,
                   num_experts=1, hidden_size=1, group_size=1, activation=None)
  assert layers.CAPACITY_FACTOR_ZERO_OK  # 0: C = min_capacity (the Hugging Face import)
  for name in experts.ACTIVATIONS:
    layers.SwitchFFN(activation=name)
    layers.SwitchFFN(activation=(name, "linear"))


# gated units of several activations at once: one graph per dispatch covers every name
_NAMES = sorted(experts.ACTIVATIONS)


@pytest.mark.parametrize("names", [_NAMES[i::3] for i in range(3)], ids=["/".join(
    _NAMES[i::3]) for i in range(3)])
def test_every_activation_runs_with_every_dispatch(rng, names):
  """The names the constructor accepts work with the einsum/gather dispatch (mtf.<name>) and
  the ragged one (experts.ACTIVATIONS), with the same outputs."""
  x = rng.randn(2, 8, 8).astype(np.float32)
  einsum, ragged = [run_switch(layers.SwitchFFN(
      num_experts=4, hidden_size=8, group_size=16, activation=names, dispatch=d,
      router_policy="argmax", init_scale=1.0), x)[0] for d in ("einsum", "ragged")]
  np.testing.assert_allclose(ragged, einsum, rtol=1e-5, atol=1e-7)
  assert np.abs(einsum).max() > 1e-4


def test_switch_argument_through_the_binary(failing_runs):
  """SwitchFFN.hidden_size=0 used to reach a ZeroDivisionError in the optimizer after ~30 s."""
  line = failed_with(failing_runs, "hidden_size", "ValueError")
  assert "SwitchFFN.hidden_size must be an integer >= 1" in line


# ---------------------------------------------------------------- 2. a corpus that is not text


def test_corpus_that_is_not_text_is_refused(tmp_path, failing_runs):
  noise = tmp_path / "noise.txt"
  noise.write_bytes(np.random.RandomState(1).bytes(5000))
  error = timed("random bytes as corpus", corpus_lib._count_lines, str(noise))  # pylint: disable=protected-access
  assert isinstance(error, ValueError)
  assert repr(str(noise)) in str(error) and "is not text" in str(error)
  assert "mtf_switch.tasks.text_files.paths" in str(error)
  line = failed_with(failing_runs, "corpus", "ValueError")
  assert "noise.txt' is not text" in line and "not UTF-8" in line
  # gzip text named .txt, and a .gz that is not gzip
  gz = tmp_path / "gz.txt"
  gz.write_bytes(subprocess.run(["gzip", "-c"], input=b"some text\n" * 500,
                                capture_output=True, check=True).stdout)
  assert "name it .txt.gz" in str(timed("gzip as .txt", corpus_lib._count_lines, str(gz)))  # pylint: disable=protected-access
  fake = tmp_path / "plain.txt.gz"
  fake.write_text("some text\n")
  assert "not a complete gzip file" in str(timed("text as .gz", corpus_lib._count_lines,  # pylint: disable=protected-access
                                                 str(fake)))


@pytest.mark.parametrize("path", ["../shared/data/gcide.txt.gz",
                                  "../shared/data/kernel-docs.txt.gz", None])
def test_real_text_is_kept(path, tmp_path, monkeypatch):
  """Real corpora pass, GCIDE's few stray cp1252 bytes included; so does a small file with one
  bad byte (replaced when read) and the embedded default corpus."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if path is None:
    monkeypatch.setenv("MTF_SWITCH_CACHE", str(tmp_path))
    path = corpus_lib.default_corpus_file()
    small = tmp_path / "small.txt"
    small.write_bytes(b"A line of ordinary text.\n" * 40 + b"A caf\xe9 with a latin-1 byte.\n")
    assert corpus_lib._count_lines(str(small)) == 41  # pylint: disable=protected-access
  else:
    path = os.path.join(root, path)
    if not os.path.exists(path):
      pytest.skip("no " + path)
  start = time.time()
  assert corpus_lib._count_lines(path) > 10000  # pylint: disable=protected-access
  print("\n%s checked in %.2f s" % (os.path.basename(path), time.time() - start))


# ---------------------------------------------------------------- 3. an export asked too much

SERVE = """
import json, sys, time
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops

answers = {}
for name, saved_model, request in json.loads(sys.argv[1]):
  signature = tf.saved_model.load(saved_model).signatures["serving_default"]
  start = time.time()
  try:
    out = signature(**{k: tf.constant(v) for k, v in request.items()})
    answers[name] = ["ok", {k: len(v) for k, v in out.items()}, time.time() - start]
  except tf.errors.InvalidArgumentError as e:
    answers[name] = [type(e).__name__, e.message, time.time() - start]
answers["modules"] = [m for m in sys.modules
                      if m.split(".")[0] in ("mtf_switch", "mesh_tensorflow", "t5")]
print(json.dumps(answers))
"""


def test_export_states_its_request_limit(pretrained_switch, tmp_path):
  """A SavedModel exported with --batch_size=2 and asked for 3 examples names its limit (it
  used to fail with "Dataset had more than one element"); served by plain TensorFlow."""
  env, model_dir, _ = pretrained_switch
  api = ["--use_model_api", "--model_dir=%s" % model_dir, "--batch_size=2",
         "--input_sequence_length=128", "--target_sequence_length=32"]
  binary.finish(*[binary.start(env, str(tmp_path), mode, binary.BINARY,
                               "--module_import=mtf_switch", "--mode=" + mode,
                               "--export_dir=" + mode, *api)
                  for mode in ("export_predict", "export_score")])
  saved = {mode: str(next((tmp_path / mode).iterdir()))
           for mode in ("export_predict", "export_score")}
  strings = ["Return the number of items.", "Open a file.", "Close it."]
  requests = [
      ("predict_2", saved["export_predict"], {"inputs": strings[:2]}),
      ("predict_3", saved["export_predict"], {"inputs": strings}),
      ("score_3", saved["export_score"], {"inputs": strings, "targets": strings}),
      ("score_unpaired", saved["export_score"], {"inputs": strings[:2],
                                                 "targets": strings[:1]}),
  ]
  proc = subprocess.run([sys.executable, "-c", SERVE, json.dumps(requests)], env=env,
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  answers = json.loads(proc.stdout.strip().splitlines()[-1])
  assert answers.pop("modules") == []  # served without mtf_switch, mesh_tensorflow or t5
  for name, (kind, detail, seconds) in answers.items():
    print("\nserving %s: %s after %.2f s: %s" % (name, kind, seconds, str(detail)[:400]))
  assert answers["predict_2"][:2] == ["ok", {"inputs": 2, "outputs": 2}]
  for name in ("predict_3", "score_3"):
    kind, message, _ = answers[name]
    assert kind == "InvalidArgumentError"
    assert guards.request_limit_message(2) in message and "this request:] [3]" in message
    assert "Dataset had more than one element" not in message
  kind, message, _ = answers["score_unpaired"]
  assert kind == "InvalidArgumentError" and "one target per input" in message


# ---------------------------------------------------------------- 4. one run per model_dir


def test_second_run_into_a_model_dir_is_refused(tmp_path, failing_runs):
  model_dir = str(tmp_path / "model")
  handle = guards.lock_model_dir(model_dir)
  with open(os.path.join(model_dir, guards.LOCK_FILE)) as f:
    mine = json.load(f)
  assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
  error = timed("second lock", guards.lock_model_dir, model_dir)
  assert isinstance(error, guards.ModelDirInUse)
  assert "pid %d on host %s" % (os.getpid(), socket.gethostname()) in str(error)
  assert mine["started"] in str(error) and "--model_dir=" + model_dir in str(error)
  guards.unlock_model_dir(handle)
  assert not os.path.exists(os.path.join(model_dir, guards.LOCK_FILE))
  # through the binary: refused before building anything, naming this process
  line = failed_with(failing_runs, "lock", "ModelDirInUse")
  assert "pid %d on host %s" % (os.getpid(), socket.gethostname()) in line
  assert "command: " in line


def test_lock_of_an_ended_run_is_taken_over(tmp_path):
  ended = subprocess.Popen(["true"])
  ended.wait()
  model_dir = str(tmp_path)
  with open(os.path.join(model_dir, guards.LOCK_FILE), "w") as f:
    json.dump({"pid": ended.pid, "host": socket.gethostname(), "started": "earlier",
               "command": "an ended run"}, f)
  with guards.training_lock(model_dir):  # warns, then holds it
    with open(os.path.join(model_dir, guards.LOCK_FILE)) as f:
      assert json.load(f)["pid"] == os.getpid()
  assert not os.path.exists(os.path.join(model_dir, guards.LOCK_FILE))
  # a run on another host cannot be checked: refused, with what to do
  with open(os.path.join(model_dir, guards.LOCK_FILE), "w") as f:
    json.dump({"pid": 1, "host": "elsewhere", "started": "earlier", "command": "c"}, f)
  error = timed("lock of another host", guards.lock_model_dir, model_dir)
  assert "another host" in str(error) and "delete it only if" in str(error)


# ---------------------------------------------------------------- 5. layout and groups, early


def _model(**switch):
  stack = transformer.LayerStack([layers.SwitchFFN(**switch)])
  return transformer.Unitransformer(layer_stack=stack, d_model=8, input_vocab_size=16,
                                    output_vocab_size=16, autoregressive=True, max_length=16)


def test_layout_and_group_errors_come_before_the_graph(failing_runs):
  """Experts not dividing their mesh axis: raised when the estimator is created, not ~7 s
  later while the graph is built; expert_hidden and the batch likewise; a training capacity
  of 0 tokens when training starts, before the input pipeline."""
  line = failed_with(failing_runs, "layout", "ValueError")
  assert "SwitchFFN.num_experts=6 is not divisible by the 4-way mesh axis" in line
  model = _model(num_experts=4, hidden_size=6)
  error = timed("expert_hidden layout", guards.check_layout, model, "model:4",
                "expert_hidden:model", 8)
  assert "`expert_hidden` (size 6, in the experts: SwitchFFN.hidden_size)" in str(error)
  error = timed("batch layout", guards.check_layout, model, "batch:4", "batch:batch", 6)
  assert "`batch` (size 6, in the batch: --batch_size" in str(error)
  guards.check_layout(model, "batch:2,model:2", "batch:batch,expert_hidden:model", 8)
  tight = _model(num_experts=8, capacity_factor_train=0.5, min_capacity=0, group_size=8)
  error = timed("training capacity", guards.check_training_groups, tight, "", "", 4,
                {"inputs": 8, "targets": 8})
  assert "capacity rounds to 0" in str(error) and "SwitchFFN.min_capacity" in str(error)
  guards.check_training_groups(_model(num_experts=8), "batch:2", "batch:batch", 4,
                               {"inputs": 8, "targets": 8})

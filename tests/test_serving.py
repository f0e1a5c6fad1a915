"""A Switch checkpoint exported as a SavedModel (`--mode=export_predict`, `--mode=export_score`)
and served by plain TensorFlow answers as `--mode=predict` and `--mode=score` do.

Both exports have one signature, "serving_default", taking a batch of at most --batch_size
strings (a larger request fails with "Dataset had more than one element"):
  export_predict: inputs -> outputs (the decodes), inputs (the inputs as the model saw them);
  export_score: inputs, targets -> scores (log-likelihood of each target given its input, the
    final EOS included), targets (the targets as scored).
Serving needs `import tensorflow_text` (its SentencePiece ops tokenize in the graph) and nothing
of mtf_switch, mesh_tensorflow or t5.

Every path encodes a string, appends EOS and cuts the ids to the sequence length (here 128 input
and 32 target tokens), so an over-long string loses its EOS in all of them; "" is EOS alone.
(`--input_file`/`--target_file` hold one string a line, and a last empty line is dropped as the
file's final newline.) A Switch layer's output can depend on the rest of the batch (expert
capacity), so each path gets the same full batch.
"""
import json
import re
import sys

import numpy as np
import pytest

import binary

BATCH_SIZE = 4
LONG = ("Open a file and return a stream. " * 400)[:10000]
INPUTS = ["Return the number of items in a container.", "", LONG,
          "The with statement wraps the execution of a block."]
TARGETS = ["number of items", "", LONG, "execution of a block"]
SERVE = """
import json, sys
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops

saved_model, requests, answers = sys.argv[1:]
signature = tf.saved_model.load(saved_model).signatures["serving_default"]
with open(requests) as f:
  answered = [{k: [x.decode() if isinstance(x, bytes) else x for x in v.numpy().tolist()]
               for k, v in signature(**{k: tf.constant(v) for k, v in request.items()}).items()}
              for request in json.load(f)]
with open(answers, "w") as f:
  json.dump({"signature": sorted(signature.structured_input_signature[1]), "answers": answered,
             "modules": [m for m in sys.modules
                         if m.split(".")[0] in ("mtf_switch", "mesh_tensorflow", "t5")]}, f)
"""


def mtf(env, workdir, name, *flags):
  """Starts the unmodified console script."""
  return binary.start(env, workdir, name, binary.BINARY, "--module_import=mtf_switch", *flags)


def serve(env, workdir, name, requests):
  """Starts answering the requests (dicts of string lists) with the SavedModel exported to
  workdir/name, in a Python that imports TensorFlow (and tensorflow_text) only; it writes the
  signature's input names and the answers to workdir/name.json."""
  saved_model, = (workdir / name).iterdir()  # <timestamp>/
  (workdir / (name + "_requests.json")).write_text(json.dumps(requests))
  return binary.start(env, workdir, "serve_" + name, sys.executable, "-c", SERVE, str(saved_model),
               name + "_requests.json", name + ".json")


# A command-line binding must reach every mode (mtf_switch/config.py). Both ask for inference with
# capacity (dropless_predict = False). Scoring: with capacity 1 per expert and group (min 4 by
# default) most tokens skip the Switch layers, so the scores change (by 1e-5 to 1e-3 relative: a
# 40-step model's Switch layers add little) and each layer logs its capacity. Decoding (this 40-step
# model's greedy decodes barely depend on its Switch layers): no minimum makes the capacity round
# to 0, which the decoding graph must refuse.
SMALL_CAPACITY = ["--gin_param=SwitchFFN.dropless_predict=False",
                  "--gin_param=SwitchFFN.capacity_factor_eval=0.01",
                  "--gin_param=SwitchFFN.min_capacity=1"]
ZERO_CAPACITY = SMALL_CAPACITY[:2] + ["--gin_param=SwitchFFN.min_capacity=0"]


def failed(*runs):
  """Waits for started (process, log) pairs that must fail; returns their logs."""
  logs = []
  for proc, log in runs:
    assert proc.wait(timeout=900) != 0
    with open(log) as f:
      logs.append(f.read())
  return logs


@pytest.fixture(scope="module")
def work(pretrained_switch, tmp_path_factory):
  """Predicts, scores and exports the session's pretrained switch_tiny (step 40), and again with
  SMALL_CAPACITY (scoring) and ZERO_CAPACITY (decoding); serves the exports. Each step's commands
  run concurrently."""
  env, model_dir, _ = pretrained_switch
  work = tmp_path_factory.mktemp("serving")
  model = "--model_dir=%s" % model_dir
  (work / "inputs.txt").write_text("".join(s + "\n" for s in INPUTS))
  (work / "targets.txt").write_text("".join(s + "\n" for s in TARGETS))
  api = ["--use_model_api", model, "--batch_size=%d" % BATCH_SIZE,
         "--input_sequence_length=128", "--target_sequence_length=32"]
  predict = ["--mode=predict", "--input_file=inputs.txt"] + api
  score = ["--mode=score", "--input_file=inputs.txt", "--target_file=targets.txt"] + api
  zero = [mtf(env, work, "predict_zero", *predict, "--output_file=zero.txt", *ZERO_CAPACITY)]
  binary.finish(mtf(env, work, "predict", *predict, "--output_file=predictions.txt"),
                mtf(env, work, "score", *score, "--output_file=scores"),
                mtf(env, work, "score_small", *score, "--output_file=scores_small",
                    *SMALL_CAPACITY))
  zero.append(mtf(env, work, "export_predict_zero", "--mode=export_predict",
                  "--export_dir=export_zero", *api, *ZERO_CAPACITY))
  binary.finish(mtf(env, work, "export_predict", "--mode=export_predict",
                    "--export_dir=export_predict", *api),
                mtf(env, work, "export_score", "--mode=export_score", "--export_dir=export_score",
                    *api),
                mtf(env, work, "export_score_small", "--mode=export_score",
                    "--export_dir=export_score_small", *api, *SMALL_CAPACITY))
  requests = [{"inputs": INPUTS, "targets": TARGETS},
              {"inputs": INPUTS[:2], "targets": TARGETS[:2]}]
  binary.finish(serve(env, work, "export_predict", [{"inputs": INPUTS}]),
                serve(env, work, "export_score", requests),
                serve(env, work, "export_score_small", requests))
  for name, log in zip(("predict_zero", "export_predict_zero"), failed(*zero)):
    (work / (name + ".log")).write_text(log)
  return work


def served(work, name):
  result = json.loads((work / (name + ".json")).read_text())
  assert result["modules"] == []  # neither mtf_switch nor mesh_tensorflow nor t5
  return result["signature"], result["answers"]


def test_export_predict_answers_as_mode_predict(work):
  names, (answer,) = served(work, "export_predict")
  assert names == ["inputs"] and sorted(answer) == ["inputs", "outputs"]
  # --mode=predict writes one line per input (upstream replaces newlines by spaces)
  predicted = (work / "predictions.txt-40").read_text().splitlines()
  assert predicted == [o.replace("\n", " ") for o in answer["outputs"]]
  assert any(predicted)
  # the long input is cut to 128 tokens (the model sees a prefix, without EOS)
  seen = answer["inputs"][2]
  assert 100 < len(seen) < 1000 and LONG.startswith(seen), seen


def test_export_score_answers_as_mode_score(work):
  names, (full, part) = served(work, "export_score")
  assert names == ["inputs", "targets"] and sorted(full) == ["scores", "targets"]
  scores = np.loadtxt(work / "scores.scores")
  assert scores.shape == (4,) and np.all(scores < 0)
  np.testing.assert_allclose(full["scores"], scores, rtol=1e-5)
  assert full["targets"] == (work / "scores.targets").read_text().splitlines()
  assert full["targets"][1] == "" and LONG.startswith(full["targets"][2])  # 32 tokens
  assert len(full["targets"][2]) < 300
  # a smaller request gets as many answers as it has examples (patches._trim_to_request)
  assert len(part["scores"]) == 2 and part["targets"] == full["targets"][:2]


def test_scores_count_and_lengths_include_eos(work):
  """`.lengths` counts the tokens each score covers: the target's, its EOS, cut to 32."""
  import seqio  # pylint: disable=g-import-not-at-top
  import mtf_switch.tasks  # pylint: disable=g-import-not-at-top,unused-import
  vocab = seqio.get_mixture_or_task("mtf_switch_span_corruption").output_features[
      "targets"].vocabulary
  lengths = np.loadtxt(work / "scores.lengths").astype(int).tolist()
  assert lengths == [min(len(vocab.encode(t)) + 1, 32) for t in TARGETS]
  assert lengths[1] == 1 and lengths[2] == 32


def test_a_command_line_binding_reaches_every_inference_mode(work):
  """SMALL_CAPACITY on the command line changes --mode=score and is built into the scoring
  export (its answers equal the mode's with the same binding); ZERO_CAPACITY reaches the decoding
  graphs of --mode=predict and export_predict, which refuse it."""
  for name in ("score_small", "export_score_small"):  # the graph was built with capacity 1
    built = re.findall(r"Switch layer (\w+)/\S+ \(predict\): .*, (capacity 1 per expert|dropless)",
                       (work / (name + ".log")).read_text())
    assert sorted(set(built)) == [("decoder", "capacity 1 per expert"),
                                  ("encoder", "capacity 1 per expert")], (name, built)
  small = np.loadtxt(work / "scores_small.scores")
  (_, (default, _)), (_, (full, _)) = (served(work, n) for n in ("export_score", "export_score_small"))
  np.testing.assert_allclose(full["scores"], small, rtol=1e-5)
  # full-precision scores of the two exports: apart by more than float32 rounding (~1e-7)
  assert np.abs(np.array(full["scores"]) / default["scores"] - 1).max() > 1e-5
  for name in ("predict_zero", "export_predict_zero"):
    assert "Expert capacity rounds to 0 tokens" in (work / (name + ".log")).read_text(), name

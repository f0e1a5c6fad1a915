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


@pytest.fixture(scope="module")
def work(pretrained_switch, tmp_path_factory):
  """Predicts, scores and exports the session's pretrained switch_tiny (step 40); serves the
  exports. Each step's commands run concurrently."""
  env, model_dir, _ = pretrained_switch
  work = tmp_path_factory.mktemp("serving")
  model = "--model_dir=%s" % model_dir
  (work / "inputs.txt").write_text("".join(s + "\n" for s in INPUTS))
  (work / "targets.txt").write_text("".join(s + "\n" for s in TARGETS))
  api = ["--use_model_api", model, "--batch_size=%d" % BATCH_SIZE,
         "--input_sequence_length=128", "--target_sequence_length=32"]
  binary.finish(mtf(env, work, "predict", "--mode=predict", "--input_file=inputs.txt",
             "--output_file=predictions.txt", *api),
         mtf(env, work, "score", "--mode=score", "--input_file=inputs.txt",
             "--target_file=targets.txt", "--output_file=scores", *api),
         mtf(env, work, "export_predict", "--mode=export_predict", "--export_dir=export_predict",
             *api),
         mtf(env, work, "export_score", "--mode=export_score", "--export_dir=export_score", *api))
  binary.finish(serve(env, work, "export_predict", [{"inputs": INPUTS}]),
         serve(env, work, "export_score", [{"inputs": INPUTS, "targets": TARGETS},
                                           {"inputs": INPUTS[:2], "targets": TARGETS[:2]}]))
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

"""t5's Python workflow (t5.models.MtfModel, the t5 Colab way) with a Switch model file and
nothing else: the README's example, run as written (in a fresh interpreter), then its export
served by plain TensorFlow."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import tensorflow.compat.v1 as tf

import binary
import test_serving

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_example():
  """The README's Python example (the code block after "## The Python workflow")."""
  with open(README) as f:
    section = f.read().split("## The Python workflow", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_trains_evaluates_predicts_scores_and_exports(tmp_path, binary_env):
  code = readme_example()
  assert "gin.parse_config_file(\"gin/models/switch_tiny.gin\")" in code
  # the test's smaller switch_tiny (one sparse block per stack) and a 2-step run
  code = code.replace('gin.parse_config_file("gin/models/switch_tiny.gin")',
                      'gin.parse_config_file("gin/models/switch_tiny.gin")\n'
                      '  gin.parse_config(["num_layers = 2", "num_blocks = 1"])')
  code = code.replace("steps=600", "steps=2").replace("save_checkpoints_steps=200",
                                                        "save_checkpoints_steps=2")
  (tmp_path / "inputs.txt").write_text("Return the number of items in a container.\nOpen it.\n")
  env = binary_env
  proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-5000:]
  model_dir = tmp_path / "runs" / "switch_tiny_py"
  assert tf.train.latest_checkpoint(str(model_dir)).endswith("model.ckpt-2")
  # training wrote the Switch routing summaries; the evaluation the task's accuracy
  tags = {v.tag for path in model_dir.glob("events.*")
          for e in tf.train.summary_iterator(str(path)) for v in e.summary.value}
  assert any(t.startswith("switch/") and t.endswith("/dropped_fraction") for t in tags), tags
  eval_tags = {v.tag for path in (model_dir / "validation_eval").glob("events.*")
               for e in tf.train.summary_iterator(str(path)) for v in e.summary.value}
  assert "eval/mtf_switch_last_word/accuracy" in eval_tags
  predictions = (tmp_path / "predictions.txt-2").read_text().splitlines()
  scores = np.loadtxt(tmp_path / "scores.scores")
  assert len(predictions) == 2 and scores.shape == (2,) and np.all(scores < 0)
  # the export answers as .predict did, served without mtf_switch
  export = tmp_path / "export"
  (export / "requests.json").write_text(json.dumps([{"inputs": [
      "Return the number of items in a container.", "Open it."]}]))
  saved_model, = [p for p in export.iterdir() if p.is_dir()]
  serve = subprocess.run([sys.executable, "-c", test_serving.SERVE, str(saved_model),
                          str(export / "requests.json"), str(export / "answers.json")],
                         env=env, capture_output=True, text=True, timeout=600)
  assert serve.returncode == 0, serve.stderr[-3000:]
  answer = json.loads((export / "answers.json").read_text())
  assert answer["modules"] == [] and answer["answers"][0]["outputs"] == predictions

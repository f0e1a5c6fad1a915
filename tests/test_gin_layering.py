"""What you configure is what runs: a model file's bindings survive every shipped recipe and
layout, in either order, and the command line reaches every scope (mtf_switch/config.py)."""
import glob
import os
import subprocess
import sys

import gin
import pytest

from mtf_switch import config
from mtf_switch import effective
from mtf_switch import layers

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODELS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gin/models/*.gin")))
RUNS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "gin/runs/*.gin")))
# The model API's recipes apply on top of a model directory's operative config (config.override).
MODEL_API = {"gin/runs/finetune.gin", "gin/runs/distill.gin", "gin/runs/model_api.gin"}
# Recipes that take a layout (the paper's TPU runs).
LAYOUT = {"gin/runs/pretrain_c4.gin": "gin/layouts/tpu_v3_32.gin"}
# Run, mesh and dtype settings (utils.run, utils.tpu_mesh_shape, ...) belong to recipes and
# layouts, though t5's model files bind some (t5.1.1.large.gin: model_parallelism = 2).
RUN_LEVEL = "mesh_tensorflow.transformer.utils."
# What a recipe may change of a model on purpose: fine-tuning's regularisation (Table 4).
REGULARISERS = {"gin/runs/finetune.gin": {("dropout_rate", config.MACRO, "value"),
                                          ("", "mtf_switch.layers.SwitchFFN",
                                           "expert_dropout_rate")}}


def _current(key):
  scope, selector, name = key
  return gin.config._CONFIG.get((scope, selector), {}).get(name, KeyError)  # pylint: disable=protected-access


def _lost(model, recipe):
  """{binding: (the model's value, the value after composing)} for every binding of the model
  file (and its includes) that composing it with `recipe` changes, in both orders."""
  wanted = {k: v for k, v in config.bindings([model]).items() if not k[1].startswith(RUN_LEVEL)}
  lost = {}
  others = [recipe] + ([LAYOUT[recipe]] if recipe in LAYOUT else [])
  if recipe in MODEL_API:
    orders = [lambda: (config.parse([model]), config.override([recipe]))]
  else:
    orders = [lambda: config.parse([model] + others), lambda: config.parse(others + [model])]
  for compose in orders:
    compose()
    for key, value in wanted.items():
      if key not in REGULARISERS.get(recipe, ()) and _current(key) != value:
        lost[key] = (value, _current(key))
  return lost


def test_every_model_file_survives_every_recipe_and_layout():
  """Fails on the files before the fix: 37 of 162 pairs (pretrain_c4.gin's router_policy
  replaced the ST-MoE and top-2 models' "argmax"; reproduce_cpu.gin's d_model and d_ff replaced
  every model's)."""
  assert len(MODELS) > 25 and "gin/runs/pretrain_c4.gin" in RUNS
  lost = {(m, r): _lost(m, r) for m in MODELS for r in RUNS}
  assert {pair: changed for pair, changed in lost.items() if changed} == {}


def test_recipes_bind_no_switch_setting_but_regularisation():
  for recipe in RUNS:
    for scope, selector, name in config.bindings([recipe]):
      if selector.endswith("SwitchFFN"):
        assert (scope, selector, name) in REGULARISERS.get(recipe, ()), (recipe, name)


def test_the_st_moe_model_keeps_its_router_with_the_cpu_recipe():
  config.parse(["gin/models/st_moe_tiny.gin", "gin/runs/pretrain_cpu.gin"])
  layer = layers.SwitchFFN()
  assert (layer.router_policy, layer.num_selected_experts, layer.router_z_loss_coef) == (
      "argmax", 2, 1e-3)


OPERATIVE = """
SwitchFFN.num_experts = 8
encoder/SwitchFFN.capacity_factor_eval = 2.0
decoder/SwitchFFN.capacity_factor_eval = 2.0
decoder/SwitchFFN.loss_coef = 0.01
d_ff = 256
"""


def _capacity(scope):
  with gin.config_scope(scope):
    return layers.SwitchFFN().capacity_factor_eval


def test_an_unscoped_override_replaces_the_scoped_bindings():
  config.parse([])
  with gin.unlock_config():
    gin.parse_config(OPERATIVE)
  # plain gin: the scoped bindings of an operative config shadow an unscoped one
  with gin.unlock_config():
    gin.parse_config("SwitchFFN.capacity_factor_eval = 0.5")
  assert _capacity("encoder") == 2.0
  assert config.override([], ["SwitchFFN.capacity_factor_eval = 0.5"]) == 2
  assert _capacity("encoder") == _capacity("decoder") == _capacity("") == 0.5
  # a scoped override reaches its own scope only; other parameters and macros are untouched
  config.override([], ["decoder/SwitchFFN.capacity_factor_eval = 1.0", "d_ff = 512"])
  assert (_capacity("encoder"), _capacity("decoder")) == (0.5, 1.0)
  with gin.config_scope("decoder"):
    assert layers.SwitchFFN().loss_coef == 0.01
  assert gin.query_parameter("%d_ff") == 512


def test_bindings_leave_the_config_as_it_was():
  config.parse(["gin/models/switch_tiny.gin"])
  before = {k: dict(v) for k, v in gin.config._CONFIG.items()}  # pylint: disable=protected-access
  found = config.bindings(["gin/runs/pretrain_cpu.gin"], ["SwitchFFN.num_experts = 4"])
  assert found[("", "mtf_switch.layers.SwitchFFN", "num_experts")] == 4
  assert ("", "mesh_tensorflow.transformer.utils.run", "train_steps") in found
  assert gin.config._CONFIG == before and layers.SwitchFFN().num_experts == 8  # pylint: disable=protected-access


def test_a_missing_gin_file_names_the_zoo():
  with pytest.raises(ValueError, match="switch_tiny"):
    config.parse(["gin/models/switch_tinyy.gin"])


def test_effective_settings_of_each_switch_layer():
  config.parse(["gin/models/st_moe_tiny.gin", "gin/runs/pretrain_cpu.gin"],
               ["SwitchFFN.capacity_factor_eval = 1.0"])
  train, evaluation = (effective.switch_layers(m) for m in ("train", "eval"))
  assert [l["scope"] for l in train] == ["encoder/block_000/layer_007/MoE1D/",
                                         "decoder/block_000/layer_011/MoE1D/"]
  for layer in train + evaluation:
    assert (layer["num_experts"], layer["num_selected_experts"], layer["router_policy"],
            layer["router_z_loss_coef"], layer["dispatch"]) == (8, 2, "argmax", 1e-3, "ragged")
  # 16 sequences of 128 inputs / 32 targets in groups of 512: C = S cf / E
  assert [(l["groups"], l["group_size"], l["expert_capacity"]) for l in train] == [
      (4, 512, 80), (1, 512, 80)]
  assert [l["expert_capacity"] for l in evaluation] == [64, 64]
  assert "argmax" in effective.table().splitlines()[1]


def test_effective_reports_a_bad_binding_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "mtf_switch.effective",
                         "--gin_file=gin/models/switch_tiny.gin", "--gin_param=SwitchFFN.foo=1"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: Configurable 'SwitchFFN' doesn't have a parameter named 'foo'. "
      "In bindings string line 1 SwitchFFN.foo=1")

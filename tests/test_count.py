"""The parameter/FLOP counter against closed-form counts and the paper's Table 9 / Sec. 4.1."""
import functools
import json
import subprocess
import sys
import time

import mesh_tensorflow as mtf
import pytest
import tensorflow.compat.v1 as tf

from mtf_switch import config
from mtf_switch import count

VOCAB = 32128  # 32100 padded to a multiple of 128 by mesh-tensorflow


@functools.lru_cache(maxsize=None)
def counted(model, *gin_params):
  return count.count(["gin/models/%s.gin" % model], gin_params)


def closed_form(d_model, d_ff, n_mats, heads, d_kv, layers, experts=0, every=2, tied=True,
                k=1, extra_dense=False, inputs=512, targets=114):
  """(params, Kaplan FLOPs/sequence) of a T5 encoder-decoder (embeddings tied or not), a shared
  relative attention bias per stack, RMS-norm scales, and a Switch layer with k experts per token
  at every `every`-th FFN (none if experts == 0), each followed by a dense FFN if extra_dense."""
  attn = 4 * d_model * heads * d_kv
  ffn = n_mats * d_model * d_ff
  sparse = layers // every if experts else 0
  dense = layers - sparse + (sparse if extra_dense else 0)
  expert_layer = experts * ffn + d_model * experts  # experts + router
  norms = 5 * layers + 2 + (2 * sparse if extra_dense else 0)
  params = (3 * layers * attn + 2 * dense * ffn + 2 * sparse * expert_layer
            + norms * d_model + 2 * 32 * heads + (1 if tied else 2) * VOCAB * d_model)
  per_token_enc = layers * attn + (dense + k * sparse) * ffn  # routers excluded
  per_token_dec = 2 * layers * attn + (dense + k * sparse) * ffn
  context = 2 * heads * d_kv * layers * (inputs * inputs + targets * targets + targets * inputs)
  flops = (2 * inputs * per_token_enc + 2 * targets * per_token_dec + context
           + 2 * targets * VOCAB * d_model)
  return params, flops


@pytest.mark.parametrize("model,dims", [
    ("t5_base", dict(d_model=768, d_ff=2048, n_mats=3, heads=12, d_kv=64, layers=12)),
    ("t5_large_classic", dict(d_model=1024, d_ff=4096, n_mats=2, heads=16, d_kv=64, layers=24)),
    ("switch_base", dict(d_model=768, d_ff=2048, n_mats=3, heads=12, d_kv=64, layers=12,
                         experts=128)),
    ("switch_large_classic", dict(d_model=1024, d_ff=4096, n_mats=2, heads=16, d_kv=64,
                                  layers=24, experts=128)),
    ("switch_c", dict(d_model=2080, d_ff=6144, n_mats=2, heads=32, d_kv=64, layers=15,
                      experts=2048, every=1)),
    ("switch_tiny", dict(d_model=128, d_ff=256, n_mats=3, heads=4, d_kv=32, layers=4,
                         experts=8, tied=False)),
    ("moe_base_top2", dict(d_model=768, d_ff=2048, n_mats=3, heads=12, d_kv=64, layers=12,
                           experts=128, k=2)),
    ("st_moe_l", dict(d_model=1024, d_ff=2816, n_mats=3, heads=16, d_kv=64, layers=24,
                      experts=32, every=4, k=2, extra_dense=True)),
])
def test_counts_equal_closed_form(model, dims):
  params, flops = closed_form(**dims)
  got = counted(model)
  assert got["params"] == params
  assert got["flops_per_sequence"] == flops
  assert got["dense_params"] + got["expert_params"] == params
  experts = dims.get("experts", 0)
  sparse_layers = 2 * dims["layers"] // dims.get("every", 2) if experts else 0
  assert got["expert_params"] == (
      sparse_layers * experts * dims["n_mats"] * dims["d_model"] * dims["d_ff"])
  assert got["embedding_params"] == (1 if dims.get("tied", True) else 2) * VOCAB * dims["d_model"]
  # Routers: 2 d_model E per token of their stack.
  assert got["router_flops"] == 2 * dims["d_model"] * experts * sparse_layers // 2 * (512 + 114)


# Paper numbers: parameters (Sec. 4.1, Tables 7 and 9, Fig. 4) and FLOPs per sequence (Table 9).
PAPER = {
    "t5_base": (223e6, 124e9),
    "t5_base_classic": (223e6, 124e9),
    "t5_large": (739e6, 425e9),
    "t5_large_classic": (739e6, 425e9),
    "t5_xxl": (11e9, 6.3e12),
    "switch_base": (7.4e9, 124e9),
    "switch_base_classic": (7.4e9, 124e9),
    "switch_large_classic": (26e9, 425e9),
    "switch_xxl": (395e9, 6.3e12),
    "switch_c": (1571e9, 890e9),
    "switch_base_e256": (14.7e9, 124e9),
}
# ST-MoE Table 11 parameters.
ST_MOE = {"st_moe_l": 4.1e9, "st_moe_32b": 269e9}


@pytest.mark.parametrize("model", sorted(PAPER))
def test_paper_counts(model):
  params, flops = PAPER[model]
  got = counted(model)
  assert got["params"] == pytest.approx(params, rel=0.02)
  assert got["flops_per_sequence"] == pytest.approx(flops, rel=0.10)


@pytest.mark.parametrize("model", sorted(ST_MOE))
def test_st_moe_parameter_counts(model):
  assert counted(model)["params"] == pytest.approx(ST_MOE[model], rel=0.01)


def test_top2_doubles_only_the_expert_flops():
  top1, top2 = counted("switch_base"), counted("moe_base_top2")
  assert top2["params"] == top1["params"]
  # 12 sparse layers, each one more expert FFN (3 * 768 * 2048 weights) per token of its stack
  assert top2["flops_per_sequence"] - top1["flops_per_sequence"] == \
      2 * 3 * 768 * 2048 * 6 * (512 + 114)


def test_switch_large_as_printed_in_table_9():
  """Table 9's Switch-Large (GEGLU d_ff 2816) adds up to 27.1B, not the printed 26B (that is
  switch_large_classic); its FLOPs match T5-Large's."""
  got = counted("switch_large")
  assert got["params"] == pytest.approx(27.12e9, rel=1e-3)
  assert got["flops_per_sequence"] == counted("t5_large")["flops_per_sequence"]
  assert got["flops_per_sequence"] == pytest.approx(425e9, rel=0.10)


def test_every_zoo_model_counts_and_switch_models_are_flop_matched():
  zoo = config.zoo()
  assert {"t5_base", "t5_large", "t5_xxl", "switch_base", "switch_large", "switch_xxl",
          "switch_c", "switch_base_plus", "switch_base_classic", "switch_large_classic"} <= set(zoo)
  ladder = [counted("switch_base_e%d" % e) for e in (2, 4, 8, 16, 32, 64, 128, 256)]
  assert [r["flops_per_sequence"] for r in ladder] == [
      counted("t5_base")["flops_per_sequence"]] * 8
  assert all(a["params"] < b["params"] for a, b in zip(ladder, ladder[1:]))
  assert ladder[6] == counted("switch_base")
  for model in zoo:
    got = counted(model)
    assert got["params"] > got["expert_params"] >= 0, model
    assert (got["expert_params"] > 0) == model.startswith(
        ("switch", "moe", "st_moe", "expert_choice")), model
  plus = counted("switch_base_plus")
  assert plus["flops_per_sequence"] > counted("switch_base")["flops_per_sequence"]


def test_cli_counts_switch_c_within_a_minute():
  start = time.time()
  out = subprocess.run([sys.executable, "-m", "mtf_switch.count",
                        "--gin_file=gin/models/switch_c.gin"],
                       capture_output=True, text=True, check=True).stdout
  assert time.time() - start < 60
  result = json.loads(out.strip().splitlines()[-1])
  assert result["params"] == counted("switch_c")["params"]
  assert {"params", "expert_params", "dense_params", "flops_per_sequence"} <= set(result)


def test_unknown_model_lists_the_zoo():
  with pytest.raises(ValueError, match="switch_huge.*model zoo: .*switch_base"):
    count.count(["gin/models/switch_huge.gin"])


def test_layouts_are_checked():
  # Table 1's 32 cores with experts over the batch axis: 4 of Switch-Base's 128 experts per core.
  assert counted("switch_base", "include 'gin/layouts/tpu_v3_32.gin'")["params"] == \
      counted("switch_base")["params"]
  with pytest.raises(ValueError, match=r"`vocab` \(size 32128.*mesh axis `model` of size 5"):
    count.count(["gin/models/t5_base.gin"], [
        "include 'gin/layouts/tpu_expert_model_data.gin'",
        "utils.tpu_mesh_shape.tpu_topology = 'v3-32'",
        "utils.tpu_mesh_shape.model_parallelism = 5"])
  with pytest.raises(ValueError, match="num_experts=128 is not divisible by the 512-way"):
    count.count(["gin/models/switch_base.gin"], [
        "include 'gin/layouts/tpu_v3_32.gin'", "utils.tpu_mesh_shape.tpu_topology = 'v3-512'"])


def test_lowering_an_undivided_layout_names_the_dimension():
  graph = mtf.Graph()
  mesh = mtf.Mesh(graph, "mesh")
  x = mtf.import_tf_tensor(mesh, tf.zeros([4, 6]), mtf.Shape(
      [mtf.Dimension("batch", 4), mtf.Dimension("d_ff", 6)]))
  y = mtf.reduce_sum(x * 2.0)
  mesh_impl = mtf.placement_mesh_impl.PlacementMeshImpl(
      "model:4", "d_ff:model", [""] * 4)
  with pytest.raises(ValueError, match=r"`d_ff` \(size 6.*`model` of size 4.*d_ff:model"):
    mtf.Lowering(graph, {mesh: mesh_impl}).export_to_tf_tensor(y)

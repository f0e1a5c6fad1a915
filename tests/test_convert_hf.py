"""Hugging Face SwitchTransformers checkpoints imported with mtf_switch.convert_hf score in
`t5_mesh_transformer --use_model_api --mode=score` as in PyTorch: tiny random
SwitchTransformersForConditionalGeneration models (d_model 32, 2+2 layers, 4 experts), saved with
save_pretrained and converted, give each example's log-likelihood (target tokens and EOS) to
1e-4, with a capacity that drops no token and with one where HF drops some. No network; the
default corpus vocabulary (4196 ids, HF vocab_size 4224)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import binary
from mtf_switch import convert_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

INPUTS = ["Return the number of items in a container, or raise an error if it is empty.",
          "Open a file and return a stream; raise OSError upon failure.",
          "The with statement wraps the execution of a block with methods of a context manager.",
          "Create a new dictionary with keys from an iterable and values set to value."]
TARGETS = ["the number of items in a container",
           "a stream; raise OSError upon failure of the call",
           "with methods defined by a context manager object",
           "keys from an iterable and values set to a value."]
BATCH_SIZE = 2  # two batches: the scores do not depend on the batch
# The stock binary's entry point. mesh-tensorflow writes scores with "%g" (6 significant digits:
# 1e-3 at -200), so the scores also go to <output_file>.full_scores with 9.
SCORE = """
import sys
import numpy as np
from mesh_tensorflow.transformer import utils
from t5.models import mesh_transformer_main
save_scores = utils.save_scores
def save_full_scores(results, vocabulary, scores_filename=None, **kwargs):
  np.savetxt(scores_filename + ".full_scores", [r["scores"] for r in results], fmt="%.9g")
  return save_scores(results, vocabulary, scores_filename=scores_filename, **kwargs)
utils.save_scores = save_full_scores
sys.argv[0] = "t5_mesh_transformer"
mesh_transformer_main.console_entry_point()
"""
TINY = dict(vocab_size=4224, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
            num_decoder_layers=2, num_experts=4, dropout_rate=0.0)
CASES = {
    # No token dropped (capacity 64); untied lm head, gelu_new, every encoder layer sparse.
    "no_drops": dict(expert_capacity=64, tie_word_embeddings=False, dense_act_fn="gelu_new",
                     num_sparse_encoder_layers=2, num_sparse_decoder_layers=1),
    # Capacity 2 of 4 experts: sequences of more than 8 tokens drop some. As released
    # checkpoints: tied embeddings, ReLU, every other layer sparse.
    "drops": dict(expert_capacity=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1),
}


def hf_scores(model, examples):
  """Per example: sum of log p(target token) over target + EOS (decoder inputs shifted right
  from 0), and the number of tokens HF routed past their expert's capacity, per stack."""
  capacity = model.config.expert_capacity
  scores, dropped = [], {"encoder": 0, "decoder": 0}
  for inputs, targets in examples:
    labels = torch.tensor([targets])
    with torch.no_grad():
      out = model(input_ids=torch.tensor([inputs]), labels=labels,
                  decoder_input_ids=torch.tensor([[0] + targets[:-1]]),
                  output_router_logits=True)
    log_probs = torch.log_softmax(out.logits.double(), -1)
    scores.append(log_probs[0, range(len(targets)), targets].sum().item())
    for stack in dropped:
      for logits in getattr(out, stack + "_router_logits"):
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])
        dropped[stack] += int(((one_hot.cumsum(1) > capacity) & (one_hot > 0)).sum())
  return np.array(scores), dropped


@pytest.fixture(scope="module")
def converted(tmp_path_factory, binary_env):
  """{case: (HF scores, HF drops, mtf scores, HF scores without capacity limit)}; the
  conversions and the scoring runs of both cases run concurrently."""
  work = tmp_path_factory.mktemp("convert_hf")
  env = binary_env
  (work / "inputs.txt").write_text("".join(s + "\n" for s in INPUTS))
  (work / "targets.txt").write_text("".join(s + "\n" for s in TARGETS))
  hf = {}
  for seed, (case, settings) in enumerate(CASES.items()):
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig(**TINY, **settings)).eval()
    model.save_pretrained(work / ("hf_" + case))
    hf[case] = model

  binary.finish(*[binary.start(env, work, "convert_" + case, sys.executable, "-m",
                               "mtf_switch.convert_hf", "--hf_dir=hf_" + case,
                               "--model_dir=" + case, "--vocabulary=mtf_switch")
                  for case in CASES])
  binary.finish(*[binary.start(env, work, "score_" + case, sys.executable, "-c", SCORE,
                               "--module_import=mtf_switch", "--use_model_api",
                               "--model_dir=" + case, "--mode=score", "--input_file=inputs.txt",
                               "--target_file=targets.txt", "--output_file=scores_" + case,
                               "--batch_size=%d" % BATCH_SIZE, "--input_sequence_length=32",
                               "--target_sequence_length=32")
                  for case in CASES])
  # The token ids the binary scored: encode with the same (cached) vocabulary, EOS appended.
  ids = json.loads(subprocess.run(
      [sys.executable, "-c", "import json, sys, mtf_switch.tasks as t; print(json.dumps("
       "[t.VOCABULARY.encode(s) + [1] for s in sys.argv[1:]]))"] + INPUTS + TARGETS,
      env=env, check=True, capture_output=True, text=True).stdout)
  examples = list(zip(ids[:len(INPUTS)], ids[len(INPUTS):]))
  assert all(len(i) < 32 and len(t) < 32 for i, t in examples)  # nothing cut
  results = {}
  for case, model in hf.items():
    full, printed = (np.loadtxt(work / ("scores_%s.%s" % (case, suffix)))
                     for suffix in ("full_scores", "scores"))
    np.testing.assert_allclose(printed, full, rtol=1e-5)
    scores, dropped = hf_scores(model, examples)
    for router in (m for m in model.modules() if hasattr(m, "expert_capacity")):
      router.expert_capacity = 10**6  # what HF would give if it dropped no token
    results[case] = scores, dropped, full, hf_scores(model, examples)[0]
  return results


@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_pytorch(converted, case):
  hf, dropped, mtf, hf_no_drops = converted[case]
  assert mtf.shape == hf.shape == (len(INPUTS),) and np.all(hf < 0)
  if case == "drops":  # the dropped tokens change the scores: mtf dropped the same ones
    assert dropped["encoder"] > 0 and dropped["decoder"] > 0, dropped
    assert np.abs(hf_no_drops - hf).min() > 0.1
  else:
    assert dropped == {"encoder": 0, "decoder": 0}
    np.testing.assert_array_equal(hf_no_drops, hf)
  np.testing.assert_allclose(mtf, hf, rtol=0, atol=1e-4)


def test_layer_names_follow_switch_base_classic():
  """Every-other-layer models (the released ones) get switch_base_classic.gin's names."""
  config = transformers.SwitchTransformersConfig(
      num_layers=4, num_decoder_layers=4, num_experts=8, num_sparse_encoder_layers=2,
      num_sparse_decoder_layers=2)
  plan = convert_hf.variable_map(config)
  assert plan["encoder/block_001/layer_003/MoE1D/wi/kernel"][0] == [
      "encoder.block.3.layer.1.mlp.experts.expert_%d.wi.weight" % e for e in range(8)]
  assert plan["decoder/block_001/layer_002/DenseReluDense/wo/kernel"][0] == [
      "decoder.block.2.layer.2.mlp.wo.weight"]
  assert "shared/embedding" in plan and "decoder/logits/kernel" not in plan
  # HF puts a sparse layer at i % step == 1: with step 3 the pattern repeats every 3 layers.
  assert convert_hf.sparse_layers(6, 3) == [False, True, False] * 2
  assert convert_hf.sparse_layers(3, 1) == [True] * 3


def test_unsupported_config_and_unmapped_tensors_are_listed(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  bad = transformers.SwitchTransformersConfig(
      **TINY, router_bias=True, router_dtype="bfloat16", relative_attention_max_distance=64,
      dense_act_fn="gated-gelu")
  with pytest.raises(ValueError) as e:
    convert_hf.check_config(bad)
  for field in ("router_bias=True", "router_dtype='bfloat16'",
                "relative_attention_max_distance=64", "dense_act_fn='gated-gelu'"):
    assert field in str(e.value)

  config = transformers.SwitchTransformersConfig(**TINY, num_sparse_encoder_layers=1,
                                                 num_sparse_decoder_layers=1)
  config.save_pretrained(tmp_path)
  state = transformers.SwitchTransformersForConditionalGeneration(config).state_dict()
  state = {k: v.contiguous() for k, v in state.items() if "embed_tokens" not in k
           and k != "lm_head.weight" and k != "decoder.final_layer_norm.weight"}
  state["encoder.block.0.layer.1.mlp.extra.weight"] = torch.zeros(2)
  save_file(state, os.path.join(tmp_path, "model.safetensors"))
  with pytest.raises(ValueError) as e:
    convert_hf.convert(tmp_path, tmp_path / "out", vocabulary="t5")
  assert "missing: decoder.final_layer_norm.weight" in str(e.value)
  assert "not mapped: encoder.block.0.layer.1.mlp.extra.weight" in str(e.value)

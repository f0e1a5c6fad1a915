"""mtf_switch.export_hf against PyTorch: (a) tiny random Hugging Face SwitchTransformers models
(test_convert_hf's two cases) imported with convert_hf and exported back give the original
tensors and config; (b) a 2-layer switch_tiny_classic trained here through the binary (40
seeded steps), exported, scores in PyTorch as `--mode=score` does (target + EOS, capacity above every sequence length:
nothing dropped on either side) to 1e-4 per example and greedy-decodes as `--mode=predict`;
(c) the exported tokenizer encodes and decodes as seqio's vocabulary; (d) what HF cannot
represent is one error listing every feature, and nothing is written. No network."""
import sys

import numpy as np
import pytest

import binary
from mtf_switch import export_hf
from test_convert_hf import CASES, INPUTS, SCORE, TARGETS, TINY, hf_scores

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLASSIC_GIN = "gin/models/switch_tiny_classic.gin"
STEPS = 40
LENGTH = 32  # input and target sequence length of the binary's runs
# HF's capacity per sequence for (b): every token of a sequence fits, as mtf_switch's dropless
# inference (SwitchFFN.dropless_predict = True).
CAPACITY = LENGTH
# Config fields that decide the computation, compared in the round trip.
FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
          "num_decoder_layers", "num_experts", "encoder_sparse_step", "decoder_sparse_step",
          "expert_capacity", "relative_attention_num_buckets", "relative_attention_max_distance",
          "layer_norm_epsilon", "dropout_rate", "tie_word_embeddings", "router_jitter_noise",
          "router_aux_loss_coef", "router_z_loss_coef", "router_bias", "pad_token_id",
          "eos_token_id")


def export_cmd(model_dir, out, *flags):
  return (sys.executable, "-m", "mtf_switch.export_hf", "--model_dir=" + model_dir,
          "--out=" + out) + flags


@pytest.fixture(scope="module")
def work(binary_env, tmp_path_factory):
  """Trains switch_tiny_classic (2 layers, STEPS steps, seeded) while the HF cases are converted; then
  exports all three while the trained model scores and decodes INPUTS / TARGETS."""
  env, work = binary_env, tmp_path_factory.mktemp("export_hf")
  (work / "inputs.txt").write_text("".join(s + "\n" for s in INPUTS))
  (work / "targets.txt").write_text("".join(s + "\n" for s in TARGETS))
  for seed, (case, settings) in enumerate(CASES.items()):
    torch.manual_seed(seed)
    transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig(**TINY, **settings)).save_pretrained(
            work / ("hf_" + case))
  converts = [binary.start(env, work, "convert_" + case, sys.executable, "-m",
                           "mtf_switch.convert_hf", "--hf_dir=hf_" + case,
                           "--model_dir=mtf_" + case, "--vocabulary=mtf_switch")
              for case in CASES]
  binary.train(env, work / "classic", CLASSIC_GIN, STEPS, *binary.SMALL,
               flags=["--gin_file=gin/runs/seeded.gin"])
  binary.finish(*converts)
  api = ["--module_import=mtf_switch", "--use_model_api", "--model_dir=classic",
         "--batch_size=2", "--input_sequence_length=%d" % LENGTH,
         "--target_sequence_length=%d" % LENGTH, "--input_file=inputs.txt"]
  binary.finish(
      binary.start(env, work, "export_classic",
                   *export_cmd("classic", "classic_hf", "--expert_capacity=%d" % CAPACITY)),
      *[binary.start(env, work, "export_" + case, *export_cmd("mtf_" + case, "back_" + case))
        for case in CASES],
      binary.start(env, work, "score", sys.executable, "-c", SCORE, "--mode=score",
                   "--target_file=targets.txt", "--output_file=scores", *api),
      binary.start(env, work, "predict", binary.BINARY, "--mode=predict",
                   "--output_file=predictions.txt", *api))
  return work


def load(path):
  return transformers.SwitchTransformersForConditionalGeneration.from_pretrained(path).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_the_original_tensors_and_config(work, case):
  original, back = load(work / ("hf_" + case)), load(work / ("back_" + case))
  for field in FIELDS:
    assert getattr(back.config, field, None) == getattr(original.config, field, None), field
  assert back.config.dense_act_fn == {"relu": "relu"}.get(original.config.dense_act_fn,
                                                          "gelu_new")
  before, after = original.state_dict(), back.state_dict()
  assert sorted(after) == sorted(before)
  # Untied in transformers 5, each stack embeds with its own embed_tokens and shared.weight is
  # unused: convert_hf drops it, and the export fills it with the encoder's embedding.
  unused = set() if torch.equal(before["shared.weight"], before["encoder.embed_tokens.weight"]) \
      else {"shared.weight"}
  assert bool(unused) == (case == "no_drops")  # the untied case
  for name, tensor in before.items():
    assert name in unused or torch.equal(after[name], tensor), name


def test_pytorch_scores_and_decodes_as_the_binary(work, binary_env, monkeypatch):
  model = load(work / "classic_hf")
  tokenizer = transformers.AutoTokenizer.from_pretrained(work / "classic_hf")
  assert model.config.expert_capacity == CAPACITY and model.config.dense_act_fn == "relu"
  examples = [(tokenizer(i).input_ids, tokenizer(t).input_ids) for i, t in zip(INPUTS, TARGETS)]
  assert all(len(i) <= LENGTH and len(t) <= LENGTH and t[-1] == 1 for i, t in examples)
  scores, dropped = hf_scores(model, examples)
  assert dropped == {"encoder": 0, "decoder": 0}
  mtf = np.loadtxt(work / "scores.full_scores")
  assert mtf.shape == (len(INPUTS),) and np.all(mtf < 0)
  print("max |PyTorch - --mode=score|: %.3g" % np.abs(scores - mtf).max())
  np.testing.assert_allclose(scores, mtf, rtol=0, atol=1e-4)

  predicted = (work / ("predictions.txt-%d" % STEPS)).read_text().splitlines()
  batch = tokenizer(INPUTS, return_tensors="pt", padding=True)
  with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=LENGTH, do_sample=False, num_beams=1)
  decodes = [until_eos(ids[1:]) for ids in out.tolist()]  # after the start id 0
  assert len(predicted) == len(INPUTS) and all(decodes)
  # The binary writes the decodes as text through seqio's vocabulary: PyTorch's ids decoded the
  # same way (not the text re-encoded: HF's tokenizer adds a space piece after a sentinel
  # followed by text, and a model this young decodes mostly sentinels).
  monkeypatch.setenv("MTF_SWITCH_CACHE", binary_env["MTF_SWITCH_CACHE"])
  import mtf_switch.tasks  # pylint: disable=g-import-not-at-top
  assert [mtf_switch.tasks.VOCABULARY.decode(d) for d in decodes] == predicted


def until_eos(ids):
  return ids[:ids.index(1)] if 1 in ids else ids


def test_tokenizer_matches_seqio_vocabulary(work, binary_env, monkeypatch):
  monkeypatch.setenv("MTF_SWITCH_CACHE", binary_env["MTF_SWITCH_CACHE"])
  import mtf_switch.tasks  # pylint: disable=g-import-not-at-top
  from mtf_switch.tasks import corpus  # pylint: disable=g-import-not-at-top
  vocabulary = mtf_switch.tasks.VOCABULARY
  tokenizer = transformers.AutoTokenizer.from_pretrained(work / "classic_hf")
  assert len(tokenizer) == vocabulary.vocab_size
  texts = corpus.corpus().lines("validation")[:100] + [
      "  spaces  \tand a tab", "ünïcödé, 日本語 and ☃ (byte fallback)", "x=1; y = [2, 3]"]
  seen = set()
  for text in texts:
    ids = vocabulary.encode(text)
    seen.update(ids)
    assert tokenizer(text, add_special_tokens=False).input_ids == ids, text
    assert tokenizer.decode(ids) == vocabulary.decode(ids), text
    assert tokenizer(text).input_ids == ids + [1]  # EOS, as seqio's add_eos
  assert seen & set(range(3, 259))  # byte-fallback pieces <0x00>..<0xFF> were used
  # Sentinels: <extra_id_i> is id sp_size + 99 - i on both sides; HF's decode omits the space
  # before a sentinel (as with HF's own T5 tokenizers), and its text encodes back to the ids.
  sentinel = "The <extra_id_0> of items in a <extra_id_1> or raise <extra_id_99>"
  ids = vocabulary.encode(sentinel)
  assert tokenizer(sentinel, add_special_tokens=False).input_ids == ids
  assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [
      vocabulary.vocab_size - 1, vocabulary.vocab_size - 100]
  assert {4195, 4194, 4096} <= set(ids)
  decoded = tokenizer.decode(ids)
  assert tokenizer(decoded, add_special_tokens=False).input_ids == ids
  assert decoded.replace("<", " <").split() == vocabulary.decode(ids).split()


def test_unsupported_features_are_listed_before_writing(tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "operative_config.gin").write_text(
      "include 'gin/models/switch_tiny.gin'\ninclude 'gin/runs/pretrain_cpu.gin'\n"
      "SwitchFFN.num_selected_experts = 2\nSwitchFFN.multiplicative_bias = True\n"
      "encoder/SwitchFFN.batch_prioritized_routing = True\n")
  out = tmp_path / "out"
  with pytest.raises(ValueError) as e:
    export_hf.export(model_dir, out)
  message = str(e.value)
  for feature in ("DenseReluDense activation ['gelu', 'linear']",
                  "SwitchFFN activation ['gelu', 'linear']", "num_selected_experts=2",
                  "multiplicative_bias=True", "batch_prioritized_routing=True"):
    assert feature in message, message
  assert not out.exists()  # no checkpoint was needed, nothing written

  (model_dir / "operative_config.gin").write_text(
      "include 'gin/models/st_moe_tiny.gin'\ninclude 'gin/runs/pretrain_cpu.gin'\n")
  with pytest.raises(ValueError) as e:
    export_hf.export(model_dir, out)
  assert "encoder layers" in str(e.value) and "sparse-dense block" in str(e.value)
  assert not out.exists()

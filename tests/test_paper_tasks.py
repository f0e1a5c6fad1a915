"""Tests of mtf_switch.tasks.paper: the paper's pretraining and Table 5 tasks. Offline: the text
preprocessors run on in-memory examples shaped like the TFDS features (checked against the
builders of tfds-nightly), and nothing reads a vocabulary from gs://."""
import inspect
import pickle

import gin
import numpy as np
import pytest
import seqio
import sentencepiece as spm
from t5.data import preprocessors as t5_preprocessors
from t5.evaluation import metrics
import tensorflow.compat.v1 as tf

from conftest import numpy_examples
from mtf_switch.tasks import paper

T5_TASKS = ("glue_v002_proportional", "super_glue_v102_proportional", "squad_v010_allanswers",
            "cnn_dailymail_v002")
FINETUNE = {
    "mtf_switch_arc_easy": "ai2_arc/ARC-Easy:1.0.0",
    "mtf_switch_arc_challenge": "ai2_arc/ARC-Challenge:1.0.0",
    "mtf_switch_anli_r3": "anli/r3:0.1.0",
    "mtf_switch_winogrande_xl": "winogrande:1.1.0",
    "mtf_switch_natural_questions_open": "natural_questions_open:1.0.0",
    "mtf_switch_web_questions_open": "web_questions:1.0.0",
    "mtf_switch_trivia_qa_open": "trivia_qa/unfiltered.nocontext:1.1.0",
    "mtf_switch_xsum": "xsum:1.1.0",
}


def preprocess(task_name, *features):
  """The task's text preprocessor (its first) applied to in-memory examples, given as nested
  dicts of Python / numpy values shaped like the TFDS features."""
  def make_dataset():
    ds = tf.data.Dataset.from_tensors(features[0])
    for f in features[1:]:
      ds = ds.concatenate(tf.data.Dataset.from_tensors(f))
    return seqio.get_mixture_or_task(task_name).preprocessors[0](ds)
  return numpy_examples(make_dataset)


def span_corruption_args(task):
  """noise_density and mean_noise_span_length of the task's single span_corruption step."""
  [step] = [p for p in task.preprocessors
            if getattr(p, "func", p) is t5_preprocessors.span_corruption]
  params = inspect.signature(getattr(step, "func", step)).parameters
  args = {k: p.default for k, p in params.items()}
  args.update(getattr(step, "keywords", {}))
  return args["noise_density"], args["mean_noise_span_length"]


def test_every_name_is_registered():
  tasks, mixtures = seqio.TaskRegistry.names(), seqio.MixtureRegistry.names()
  assert set(paper.FINETUNE_TASKS) == set(FINETUNE)
  for name in [paper.C4_SPAN_CORRUPTION, *paper.MC4_TASKS.values(), *FINETUNE]:
    assert name in tasks, name
  assert paper.MC4_MIXTURE in mixtures
  assert all(name in tasks or name in mixtures for name in T5_TASKS)
  for name, tfds_name in FINETUNE.items():
    task = seqio.get_mixture_or_task(name)
    assert task.source.tfds_dataset.name == tfds_name
    assert task.output_features["targets"].vocabulary.sentencepiece_model_file == (
        "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model")


def test_c4_span_corruption_is_t5s():
  task = seqio.get_mixture_or_task(paper.C4_SPAN_CORRUPTION)
  assert task.source.tfds_dataset.name == "c4/en:2.2.0"
  assert task.preprocessors[0].keywords == {"key_map": {"inputs": None, "targets": "text"}}
  assert span_corruption_args(task) == (0.15, 3.0)
  vocab = task.output_features["inputs"].vocabulary
  assert vocab.sentencepiece_model_file == "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
  assert vocab.extra_ids == 100


def test_mc4_tasks():
  assert len(paper.MC4_TASKS) == 107  # mT5's 101 languages and 6 romanised variants
  assert len({lang.split("-")[0] for lang in paper.MC4_TASKS}) == 101
  assert paper.MC4_TASKS["bg-Latn"] == "mtf_switch_mc4_bg_Latn_span_corruption"
  task = seqio.get_mixture_or_task("mtf_switch_mc4_bg_Latn_span_corruption")
  assert task.source.tfds_dataset.name == "c4/multilingual:3.0.1"
  assert task.source.tfds_dataset._split_map == {  # pylint: disable=protected-access
      "train": "bg-Latn", "validation": "bg-Latn-validation"}
  assert span_corruption_args(task) == (0.15, 3.0)
  assert task.output_features["targets"].vocabulary is paper.MC4_VOCABULARY


def test_mc4_mixture_rates_are_mt5s(monkeypatch):
  mixture = seqio.get_mixture_or_task(paper.MC4_MIXTURE)
  assert sorted(t.name for t in mixture.tasks) == sorted(paper.MC4_TASKS.values())
  en, yo = (seqio.get_mixture_or_task(paper.MC4_TASKS[lang]) for lang in ("en", "yo"))
  monkeypatch.setattr(en.source, "num_input_examples", lambda split: {"train": 10**9}[split])
  monkeypatch.setattr(yo.source, "num_input_examples", lambda split: {"train": 10**5}[split])
  assert mixture.get_rate(en) == pytest.approx(10**(9 * 0.3))
  assert mixture.get_rate(yo) == pytest.approx(10**(5 * 0.3))


def test_mc4_vocabulary_is_lazy_and_gin_configurable(tmp_path):
  vocab = seqio.get_mixture_or_task(paper.MC4_MIXTURE).tasks[0].output_features["inputs"].vocabulary
  assert vocab == paper.MC4Vocabulary() == pickle.loads(pickle.dumps(vocab))
  assert vocab != seqio.SentencePieceVocabulary(paper.MC4_SPM_PATH)
  assert str(vocab) == f"MC4Vocabulary(file={paper.MC4_SPM_PATH})"
  assert vocab._model is None  # pylint: disable=protected-access  (nothing read gs://)
  # A local model named by gin is what the vocabulary loads.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["hello world", "switch transformer", "sparse experts"] * 30),
      model_prefix=str(tmp_path / "tiny"), vocab_size=24, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  path = str(tmp_path / "tiny.model")
  gin.parse_config(f"mtf_switch.tasks.mc4_vocabulary.sentencepiece_model_file = {path!r}")
  assert vocab.sentencepiece_model_file == path
  assert vocab.vocab_size == 24
  assert vocab.decode(vocab.encode("hello world")) == "hello world"


def test_arc():
  ex = {"id": "Mercury_1", "question": "Which gas do plants absorb?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon", "argon"],
                    "label": np.int64([0, 1, 2, 3, 4])},
        "answerKey": np.int64(1)}
  [out] = preprocess("mtf_switch_arc_challenge", ex)
  assert out["inputs"].decode() == (
      "arc_challenge question: Which gas do plants absorb? choices: (A) oxygen "
      "(B) carbon dioxide (C) helium (D) neon (E) argon")
  assert out["targets"].decode() == "carbon dioxide"
  ex["choices"] = {"text": ["1 m", "2 m", "3 m", "4 m"],
                   "label": np.int64([0, 1, 2, 3])}
  ex["answerKey"] = np.int64(3)
  [out] = preprocess("mtf_switch_arc_easy", ex)
  assert out["inputs"].decode().startswith("arc_easy question: ")
  assert out["inputs"].decode().endswith("choices: (A) 1 m (B) 2 m (C) 3 m (D) 4 m")
  assert out["targets"].decode() == "4 m"
  assert seqio.get_mixture_or_task("mtf_switch_arc_easy").metric_fns == [metrics.accuracy]


def test_anli():
  def example(label):
    return {"uid": "u", "context": "A man plays the guitar.", "hypothesis": "Nobody plays.",
            "label": np.int64(label)}
  outs = preprocess("mtf_switch_anli_r3", example(0), example(1), example(2))
  assert outs[0]["inputs"].decode() == (
      "anli_r3 hypothesis: Nobody plays. premise: A man plays the guitar.")
  assert [o["targets"].decode() for o in outs] == ["entailment", "neutral", "contradiction"]
  postprocess = seqio.get_mixture_or_task("mtf_switch_anli_r3").postprocess_fn
  assert [postprocess(s) for s in ("entailment", "contradiction", "maybe")] == [0, 2, -1]


def test_winogrande():
  def example(label):
    return {"sentence": "The trophy does not fit in the case because _ is too big.",
            "option1": "trophy", "option2": "case", "label": np.int64(label)}
  outs = preprocess("mtf_switch_winogrande_xl", example(0), example(1))
  assert outs[0]["inputs"].decode() == (
      "winogrande sentence: The trophy does not fit in the case because _ is too big. "
      "option1: trophy option2: case")
  assert [o["targets"].decode() for o in outs] == ["trophy", "case"]
  source = seqio.get_mixture_or_task("mtf_switch_winogrande_xl").source
  assert source.tfds_dataset._split_map == {  # pylint: disable=protected-access
      "train": "train_xl", "validation": "validation"}


@pytest.mark.parametrize("name,features,inputs,target,answers", [
    ("mtf_switch_natural_questions_open",
     {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
     "nq question: who wrote hamlet", "William Shakespeare",
     ["William Shakespeare", "Shakespeare"]),
    ("mtf_switch_web_questions_open",
     {"url": "http://www.freebase.com/view/en/paris", "question": "where is paris?",
      "answers": ["France", "Ile-de-France"]},
     "wq question: where is paris?", "France", ["France", "Ile-de-France"]),
    ("mtf_switch_trivia_qa_open",
     {"question": "Which planet is the Red Planet?", "question_id": "tc_1",
      "question_source": "http://www.quiz.com/",
      "entity_pages": {k: np.array([], np.bytes_)
                       for k in ("doc_source", "filename", "title", "wiki_context")},
      "search_results": {"description": np.array([], np.bytes_),
                         "filename": np.array([], np.bytes_),
                         "rank": np.array([], np.int32),
                         "title": np.array([], np.bytes_), "url": np.array([], np.bytes_),
                         "search_context": np.array([], np.bytes_)},
      "answer": {"aliases": ["Mars", "Red Planet"], "normalized_aliases": ["mars", "red planet"],
                 "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                 "normalized_value": "mars", "type": "WikipediaEntity", "value": "Mars"}},
     "trivia_qa question: Which planet is the Red Planet?", "Mars", ["Mars", "Red Planet"]),
])
def test_closed_book_qa(name, features, inputs, target, answers):
  [out] = preprocess(name, features)
  assert set(out) == {"inputs", "targets", "answers"}
  assert out["inputs"].decode() == inputs
  assert out["targets"].decode() == target
  task = seqio.get_mixture_or_task(name)
  assert task.postprocess_fn(" Mars ") == " Mars "
  assert task.postprocess_fn(target, example=out, is_target=True) == answers
  expected_metric = metrics.trivia_qa if "trivia" in name else metrics.squad
  assert task.metric_fns == [expected_metric]


def test_web_questions_evaluates_on_test():
  source = seqio.get_mixture_or_task("mtf_switch_web_questions_open").source
  assert source.tfds_dataset._split_map == {  # pylint: disable=protected-access
      "train": "train", "validation": "test"}


def test_xsum():
  [out] = preprocess("mtf_switch_xsum", {"document": "The cat sat on the mat all day.",
                                          "summary": "A cat sat."})
  assert out["inputs"].decode() == "summarize: The cat sat on the mat all day."
  assert out["targets"].decode() == "A cat sat."
  assert seqio.get_mixture_or_task("mtf_switch_xsum").metric_fns == [metrics.rouge]

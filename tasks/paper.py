"""seqio tasks of the Switch Transformer paper (Fedus et al. 2021): pretraining and Table 5.

Pretraining:
  C4_SPAN_CORRUPTION: t5's own `c4_v220_span_corruption` (TFDS c4/en:2.2.0, T5's vocabulary
    cc_all.32000 + 100 sentinels, span corruption with noise density 0.15 and mean noise span
    length 3), registered by t5.data.tasks; not duplicated here.
  mC4 (mSwitch, Sec. 5.4), registered as google-research/multilingual-t5 (multilingual_t5/tasks.py)
    does: one task `mtf_switch_mc4_<lang>_span_corruption` per language of TFDS
    c4/multilingual:3.0.1 (tfds.text.c4.MC4_LANGUAGES: mT5's 101 languages and 6 romanised
    variants, "-" written "_"), and the mixture MC4_MIXTURE with mT5's rates, (number of train
    examples) ** 0.3, computed when the mixture is sampled.

Fine-tuning: FINETUNE_TASKS lists the Table 5 tasks that t5 does not register (t5 has GLUE
`glue_v002_proportional`, SuperGLUE `super_glue_v102_proportional`, SQuAD
`squad_v010_allanswers` and CNN/DM `cnn_dailymail_v002`). Closed-book QA follows the
`*_open_test` tasks of google-research/google-research t5_closed_book_qa: trained to output one
answer, scored (postprocessors.qa) against all of them; TriviaQA is evaluated on its validation
split, as the test split's answers are hidden.

Gin parameter (read at first use, never at import):
  mc4_vocabulary.sentencepiece_model_file: the mC4 tasks' SentencePiece model, mT5's by default;
    its 100 sentinels must be part of the model, as in mT5's.
"""
import collections
import functools

import gin
import seqio
from t5.data import postprocessors as t5_postprocessors
from t5.data import preprocessors as t5_preprocessors
import t5.data.mixtures  # noqa: F401  (registers t5's mixtures: GLUE, SuperGLUE, ...)
import t5.data.tasks  # registers t5's tasks: C4_SPAN_CORRUPTION, SQuAD, CNN/DM, ...
from t5.evaluation import metrics
import tensorflow.compat.v1 as tf
import tensorflow_datasets as tfds

from .corpus import GIN_MODULE
from .vocab import ConfiguredVocabulary

C4_SPAN_CORRUPTION = "c4_v220_span_corruption"
MC4_SPM_PATH = "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"
MC4_LANGUAGES = tuple(tfds.text.c4.MC4_LANGUAGES)
MC4_TASKS = {lang: f"mtf_switch_mc4_{lang.replace('-', '_')}_span_corruption"
             for lang in MC4_LANGUAGES}
MC4_MIXTURE = "mtf_switch_mc4_span_corruption"
MC4_TEMPERATURE = 1 / 0.3  # rate = n ** (1 / temperature) = n ** 0.3
NLI_LABELS = ("entailment", "neutral", "contradiction")


def _add_task(name, **kwargs):
  seqio.TaskRegistry.remove(name)  # imported again (e.g. also as top-level `tasks`)
  seqio.TaskRegistry.add(name, **kwargs)


# ---------------------------------------------------------------- mC4


@gin.configurable(module=GIN_MODULE)
def mc4_vocabulary(sentencepiece_model_file=MC4_SPM_PATH) -> str:
  """Returns the path of the mC4 tasks' SentencePiece model (mT5's 250000 pieces + 100 sentinels
  by default)."""
  return sentencepiece_model_file


class MC4Vocabulary(ConfiguredVocabulary):
  """The gin-configured `mc4_vocabulary`, resolved at each use (its sentinels are part of the
  model, as in mT5's: no extra ids)."""

  resolve = staticmethod(mc4_vocabulary)

  def __str__(self) -> str:  # seqio's __str__ would load the model (for its md5)
    return f"MC4Vocabulary(file={self.sentencepiece_model_file})"


MC4_VOCABULARY = MC4Vocabulary()
MC4_OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=MC4_VOCABULARY, add_eos=True, required=False),
    "targets": seqio.Feature(vocabulary=MC4_VOCABULARY, add_eos=True),
}

for _lang, _name in MC4_TASKS.items():
  _add_task(
      _name,
      source=seqio.TfdsDataSource(tfds_name="c4/multilingual:3.0.1",
                                  splits={"train": _lang, "validation": f"{_lang}-validation"}),
      preprocessors=[
          functools.partial(t5_preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          t5_preprocessors.span_corruption,  # defaults: noise density 0.15, mean span length 3
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=MC4_OUTPUT_FEATURES,
      metric_fns=[])

seqio.MixtureRegistry.remove(MC4_MIXTURE)
seqio.MixtureRegistry.add(
    MC4_MIXTURE, list(MC4_TASKS.values()),
    default_rate=functools.partial(t5.data.rate_num_examples, temperature=MC4_TEMPERATURE))


# ---------------------------------------------------------------- Table 5 fine-tuning tasks


@seqio.map_over_dataset
def arc(x, benchmark_name):
  """ai2_arc -> {"inputs": "<benchmark_name> question: <question> choices: (A) <text> (B) <text>
  ...", "targets": "<text of the answerKey choice>"} (the UnifiedQA multiple-choice layout)."""
  choices = x["choices"]
  letters = tf.gather(tf.constant(list("ABCDE")), choices["label"])
  listed = tf.strings.reduce_join("(" + letters + ") " + choices["text"], separator=" ")
  return {
      "inputs": tf.strings.join([benchmark_name, " question: ", x["question"], " choices: ",
                                 listed]),
      "targets": tf.boolean_mask(choices["text"], tf.equal(choices["label"], x["answerKey"]))[0],
  }


@seqio.map_over_dataset
def anli(x, benchmark_name):
  """anli -> {"inputs": "<benchmark_name> hypothesis: <hypothesis> premise: <context>",
  "targets": "entailment" | "neutral" | "contradiction"} (t5's MNLI layout)."""
  return {
      "inputs": tf.strings.join([benchmark_name, " hypothesis: ", x["hypothesis"], " premise: ",
                                 x["context"]]),
      "targets": tf.gather(NLI_LABELS, x["label"]),
  }


@seqio.map_over_dataset
def winogrande(x):
  """winogrande -> {"inputs": "winogrande sentence: <sentence> option1: <option1> option2:
  <option2>", "targets": "<option1 if label is 0 ('1') else option2>"}."""
  return {
      "inputs": tf.strings.join(["winogrande sentence: ", x["sentence"], " option1: ",
                                 x["option1"], " option2: ", x["option2"]]),
      "targets": tf.where(tf.equal(x["label"], 0), x["option1"], x["option2"]),
  }


def _closed_book(prefix, question, answers, target):
  return {"inputs": prefix + question, "targets": target, "answers": answers}


@seqio.map_over_dataset
def natural_questions_open(x):
  """natural_questions_open -> {"inputs": "nq question: <question>", "targets": "<first answer>",
  "answers": [<all answers>]} (t5_closed_book_qa's natural_questions_open)."""
  return _closed_book("nq question: ", x["question"], x["answer"], x["answer"][0])


@seqio.map_over_dataset
def web_questions_open(x):
  """web_questions -> {"inputs": "wq question: <question>", "targets": "<first answer>",
  "answers": [<all answers>]} (t5_closed_book_qa's web_questions_open)."""
  return _closed_book("wq question: ", x["question"], x["answers"], x["answers"][0])


@seqio.map_over_dataset
def trivia_qa_open(x):
  """trivia_qa -> {"inputs": "trivia_qa question: <question>", "targets": "<answer value>",
  "answers": [<answer aliases>]} (t5_closed_book_qa's trivia_qa_open)."""
  answer = x["answer"]
  return _closed_book("trivia_qa question: ", x["question"], answer["aliases"], answer["value"])


Finetune = collections.namedtuple(
    "Finetune", "tfds_name preprocessor metric_fns postprocess_fn splits", defaults=(None, None))

FINETUNE_TASKS = {
    "mtf_switch_arc_easy": Finetune(
        "ai2_arc/ARC-Easy:1.0.0", functools.partial(arc, benchmark_name="arc_easy"),
        [metrics.accuracy]),
    "mtf_switch_arc_challenge": Finetune(
        "ai2_arc/ARC-Challenge:1.0.0", functools.partial(arc, benchmark_name="arc_challenge"),
        [metrics.accuracy]),
    "mtf_switch_anli_r3": Finetune(
        "anli/r3:0.1.0", functools.partial(anli, benchmark_name="anli_r3"), [metrics.accuracy],
        functools.partial(t5_postprocessors.string_label_to_class_id,
                          label_classes=list(NLI_LABELS))),
    # The test split's labels are hidden (-1).
    "mtf_switch_winogrande_xl": Finetune(
        "winogrande:1.1.0", winogrande, [metrics.accuracy],
        splits={"train": "train_xl", "validation": "validation"}),
    # natural_questions_open's validation split is the open-domain test set.
    "mtf_switch_natural_questions_open": Finetune(
        "natural_questions_open:1.0.0", natural_questions_open, [metrics.squad],
        postprocess_fn=t5_postprocessors.qa),
    "mtf_switch_web_questions_open": Finetune(
        "web_questions:1.0.0", web_questions_open, [metrics.squad],
        postprocess_fn=t5_postprocessors.qa,
        splits={"train": "train", "validation": "test"}),
    "mtf_switch_trivia_qa_open": Finetune(
        "trivia_qa/unfiltered.nocontext:1.1.0", trivia_qa_open, [metrics.trivia_qa],
        postprocess_fn=t5_postprocessors.qa),
    # TFDS xsum needs a manual download (see its builder).
    "mtf_switch_xsum": Finetune(
        "xsum:1.1.0",
        functools.partial(t5_preprocessors.summarize, article_key="document",
                          summary_key="summary"),
        [metrics.rouge]),
}

for _name, _task in FINETUNE_TASKS.items():
  _add_task(
      _name,
      source=seqio.TfdsDataSource(tfds_name=_task.tfds_name, splits=_task.splits),
      preprocessors=[
          _task.preprocessor,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=t5.data.tasks.DEFAULT_OUTPUT_FEATURES,
      metric_fns=_task.metric_fns,
      postprocess_fn=_task.postprocess_fn)

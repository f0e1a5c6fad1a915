"""`mtf_switch_last_word`: a text-to-text fine-tuning task over the configured corpus, offline.

LAMBADA-style last-word prediction (Paperno et al. 2016): the input is a paragraph without its
last word (at most CONTEXT_WORDS words before it), the target is that word without surrounding
punctuation; paragraphs whose last word is not purely alphabetic (code, numbers) are skipped.
The metric is exact-match accuracy. It uses the corpus' train/validation split and vocabulary
(the embedded default corpus unless `mtf_switch.tasks.text_files.paths` names other files), so a
model pretrained on `mtf_switch_span_corruption` can be fine-tuned and evaluated here.
"""
import seqio
from t5.evaluation import metrics
import tensorflow as tf

from . import corpus

TASK = "mtf_switch_last_word"
CONTEXT_WORDS = 48  # 32 tokens on average; 0.4% of the default corpus exceed 128 input tokens
MIN_WORDS = 8


def last_word(dataset):
  """{"text"} -> {"inputs": the text up to its last word, "targets": the last word}."""

  def split(example):
    words = tf.strings.split(example["text"])
    word = tf.strings.regex_replace(words[-1], r"^[^A-Za-z]+|[^A-Za-z]+$", "")
    context = words[-CONTEXT_WORDS - 1:-1]
    return {"inputs": tf.strings.reduce_join(context, separator=" "), "targets": word,
            "words": tf.size(words)}

  def keep(example):
    return (example["words"] >= MIN_WORDS) & tf.strings.regex_full_match(
        example["targets"], "[A-Za-z]+")

  return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).filter(keep).map(
      lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})


def register(output_features):
  """Registers TASK (again, if it exists) with the package's output features."""
  if TASK in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(TASK)
  seqio.TaskRegistry.add(
      TASK,
      source=seqio.FunctionDataSource(
          lambda split, shuffle_files, seed=None: corpus.corpus().dataset(
              split, shuffle_files, seed).map(lambda s: {"text": s}),
          splits=("train", "validation")),
      preprocessors=[last_word, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=lambda s, **unused: s.strip(),
      output_features=output_features,
      metric_fns=[metrics.accuracy])

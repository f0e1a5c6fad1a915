"""mtf_switch.tasks.domains: two corpus files trained on as one corpus, each with its own held-out
split, and one vocabulary trained on both (issue 20). Small synthetic files stand in for GCIDE and
kernel-docs (reading those takes about a minute); no network."""
import gzip

import gin
import pytest
import seqio

from conftest import numpy_examples
import mtf_switch.tasks as tasks
from mtf_switch.tasks import domains
from mtf_switch.tasks import vocab as vocab_lib


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("domains_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MTF_SWITCH_CACHE", str(path))
    yield path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two gzip files of distinct lines: 'dictionary' entries and 'kernel' paragraphs."""
  d = tmp_path_factory.mktemp("domains")
  words = ["abandon", "abase", "abate", "abbey", "abbot", "abdicate", "abhor", "abide"]
  lines = {
      "gcide": ["%s (n.) sense %d: the act of a word, as in the %d-th entry of the dictionary"
                % (words[i % len(words)], i, i) for i in range(3000)],
      "kernel_docs": ["The driver registers interrupt handler %d with the kernel; ioctl %d "
                      "returns -EINVAL when the device is busy" % (i, i) for i in range(1500)]}
  paths = {}
  for name, text in lines.items():
    paths[name] = str(d / (name + ".txt.gz"))
    with gzip.open(paths[name], "wb") as f:
      f.write(("\n".join(text) + "\n").encode())
  return paths, lines


@pytest.fixture
def configured(files):
  paths, lines = files
  gin.parse_config(f"""
      mtf_switch.tasks.domains.paths = {paths!r}
      mtf_switch.tasks.domains.validation_fractions = {{"gcide": 0.01, "kernel_docs": 0.2}}
      mtf_switch.tasks.sentencepiece_model.vocab_size = 400
  """)
  return paths, lines


def _read(task_name, split, **kwargs):
  source = seqio.get_mixture_or_task(task_name).source
  return [ex["text"].decode() for ex in numpy_examples(lambda: source.get_dataset(split, **kwargs))]


def test_train_mixes_both_domains_and_each_held_out_split_stays_out(configured):
  _, lines = configured
  train = _read(domains.TRAIN_TASK, "train")
  held_out = {n: _read(domains.DOMAIN_TASKS[n], "validation") for n in domains.DOMAINS}
  alone = {n: _read(domains.DOMAIN_TASKS[n], "train") for n in domains.DOMAINS}
  for name in domains.DOMAINS:
    assert sorted(alone[name] + held_out[name]) == sorted(lines[name])  # a partition of the file
    assert not set(held_out[name]) & set(train)
  # Both domains in train, nothing else; the per-file fractions (1% and 20%) are each file's.
  assert sorted(train) == sorted(alone["gcide"] + alone["kernel_docs"])
  assert 10 <= len(held_out["gcide"]) <= 60 and 250 <= len(held_out["kernel_docs"]) <= 350
  # The combined task's held-out split is the union of the two (same hash thresholds).
  assert sorted(_read(domains.TRAIN_TASK, "validation")) == sorted(
      held_out["gcide"] + held_out["kernel_docs"])
  # Shuffled, the blocks of 1024 lines of both files interleave in one order (5 blocks here:
  # one seed in 10 keeps the kernel-only blocks last, so try two).
  interleaved = []
  for seed in (3, 4):
    shuffled = _read(domains.TRAIN_TASK, "train", shuffle=True, seed=seed)
    assert sorted(shuffled) == sorted(train)
    first_kernel = next(i for i, l in enumerate(shuffled) if l.startswith("The driver"))
    last_gcide = max(i for i, l in enumerate(shuffled) if not l.startswith("The driver"))
    interleaved.append(first_kernel < last_gcide)
  assert any(interleaved)
  # Evaluation scores each domain's held-out split on its own.
  mixture = seqio.get_mixture_or_task(domains.EVAL_MIXTURE)
  assert [t.name for t in mixture.tasks] == [domains.DOMAIN_TASKS[n] for n in domains.DOMAINS]


def test_one_vocabulary_trained_on_both_train_splits(configured, monkeypatch):
  paths, lines = configured
  trained_on = []
  real_train = vocab_lib._train  # pylint: disable=protected-access

  def spy(corpus, settings):
    trained_on.append(corpus.lines("train"))
    return real_train(corpus, settings)

  monkeypatch.setattr(vocab_lib, "_train", spy)
  vocab = domains.VOCABULARY
  assert vocab.vocab_size <= 400 + vocab_lib.EXTRA_IDS
  assert len(trained_on) == 1
  held_out = set(_read(domains.TRAIN_TASK, "validation"))
  assert sorted(trained_on[0]) == sorted(set(lines["gcide"] + lines["kernel_docs"]) - held_out)
  for name in [domains.TRAIN_TASK] + list(domains.DOMAIN_TASKS.values()):
    features = seqio.get_mixture_or_task(name).output_features
    assert features["targets"].vocabulary is vocab and features["inputs"].vocabulary is vocab
  assert vocab != tasks.VOCABULARY  # not the default corpus' vocabulary
  text = "The driver registers interrupt handler 7"
  assert vocab.decode(vocab.encode(text)) == text
  assert domains.model_file() == vocab.sentencepiece_model_file  # cached: not trained again
  assert len(trained_on) == 1


def test_missing_domain_file_names_the_gin_parameter(tmp_path):
  gin.parse_config(f"mtf_switch.tasks.domains.paths = {{'kernel_docs': {str(tmp_path / 'no.gz')!r}}}")
  with pytest.raises(FileNotFoundError, match=r"mtf_switch\.tasks\.domains\.paths"):
    domains.domain_corpus()

r"""How a gin configuration is composed: search paths, defaults, and overrides that win.

Layering (README "Configuration"). t5_mesh_transformer parses mesh-tensorflow's defaults.gin,
then the command line's `--gin_file`s, then its `--gin_param`s. Each shipped file binds only its
own concern - a model file (gin/models/) the architecture and its Switch settings, a recipe
(gin/runs/) data, lengths, batch, steps, optimizer, schedule, dtype and summaries, a layout
(gin/layouts/) the mesh - so their order does not matter; the paper's Switch defaults are
SwitchFFN's own. With `--use_model_api` the model directory's operative_config.gin is parsed on
top of all that (t5's MtfModel); mtf_switch applies the command line again after it
(`override`), so the command line wins in every mode. A command-line binding also replaces the
bindings of the same parameter in narrower scopes: the operative config records every Switch
setting per stack (`encoder/SwitchFFN.capacity_factor_eval = 2.0`), and
`--gin_param=SwitchFFN.capacity_factor_eval=1.0` changes both stacks.

`python -m mtf_switch.effective` shows what a configuration makes each Switch layer do.
"""
import importlib.util
import logging
import os

from absl import flags
import gin
from mesh_tensorflow.transformer import utils as mtf_utils

MACRO = "gin.macro"  # the selector under which gin keeps macros (name = scope)


def gin_dirs():
  """Folders gin files resolve from: mtf_switch's (gin/models/..., models/...), t5's
  (models/t5.1.1.base.gin, perplexity_eval.gin, ...) and mesh-tensorflow's (defaults.gin)."""
  here = os.path.dirname(os.path.abspath(__file__))
  ours = os.path.join(here, "gin")
  ours = ours if os.path.isdir(ours) else os.path.join(os.path.dirname(here), "gin")
  t5_dir, = importlib.util.find_spec("t5").submodule_search_locations  # t5 is not imported
  return [ours, os.path.dirname(ours), os.path.join(t5_dir, "models", "gin"),
          os.path.join(os.path.dirname(mtf_utils.__file__), "gin")]


def add_search_paths():
  for path in gin_dirs():
    if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)
  root = logging.getLogger()
  if not any(isinstance(f, _QuietSearch) for f in root.filters):
    root.addFilter(_QuietSearch())


class _QuietSearch(logging.Filter):
  """gin logs "Path not found: ..." at ERROR level for every search path that does not hold a
  file before the one that does (a dozen lines per run, read as failures); a file found nowhere
  still raises IOError listing the paths searched."""

  def filter(self, record):
    return not (record.module == "resource_reader" and record.msg == "Path not found: %s")


def defaults_file():
  """mesh-tensorflow's defaults.gin, which t5_mesh_transformer parses before anything else."""
  return os.path.join(os.path.dirname(mtf_utils.__file__),
                      mtf_utils._DEFAULT_CONFIG_FILE)  # pylint: disable=protected-access


def parse_defaults():
  """What the binary binds before the command line, for Python users (`import mtf_switch` does
  it when gin holds no binding yet)."""
  add_search_paths()
  with gin.unlock_config():
    gin.parse_config_file(defaults_file())


def parse(gin_files, gin_params=(), skip_unknown=False):
  """A cleared config, then mesh-tensorflow's defaults, `gin_files` and `gin_params`, as
  t5_mesh_transformer parses them."""
  with gin.unlock_config():
    gin.clear_config()
  parse_defaults()
  for path in gin_files:
    try:
      with gin.unlock_config():
        gin.parse_config_file(path, skip_unknown=skip_unknown)
    except IOError as e:
      raise ValueError("%s. The model zoo: %s (as gin/models/<name>.gin)." % (
          str(e).split(". Searched")[0], ", ".join(zoo()))) from None
  override([], gin_params, skip_unknown)


def zoo():
  """Names of the gin model files shipped in gin/models/."""
  folder = os.path.join(gin_dirs()[0], "models")
  return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".gin"))


def bindings(gin_files=(), gin_params=(), skip_unknown=False):
  """{(scope, selector, parameter): value} that `gin_files` and `gin_params` (with their
  includes) bind, parsed into an empty config; the current config is left as it was."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  saved = {key: dict(values) for key, values in config.items()}
  try:
    config.clear()
    with gin.unlock_config():
      gin.parse_config_files_and_bindings(list(gin_files), list(gin_params),
                                          skip_unknown=skip_unknown, finalize_config=False)
    return {(scope, selector, name): value for (scope, selector), values in config.items()
            for name, value in values.items()}
  finally:
    config.clear()
    config.update(saved)


def override(gin_files=(), gin_params=(), skip_unknown=False):
  """Parses `gin_files` and `gin_params` on top of the current config; each of their bindings
  also replaces the current bindings of the same parameter in narrower scopes (an unscoped
  `SwitchFFN.x` replaces `encoder/SwitchFFN.x` and `decoder/SwitchFFN.x`). Returns the number of
  scoped bindings replaced."""
  new = bindings(gin_files, gin_params, skip_unknown)
  config = gin.config._CONFIG  # pylint: disable=protected-access
  replaced = 0
  for (scope, selector), values in config.items():
    if selector == MACRO or not scope:
      continue
    for name in values:
      wider = [(len(s), value) for (s, sel, n), value in new.items()
               if sel == selector and n == name and (not s or scope.startswith(s + "/"))]
      if wider and (scope, selector, name) not in new:
        values[name] = max(wider, key=lambda w: w[0])[1]  # the narrowest of them
        replaced += 1
  for (scope, selector, name), value in new.items():
    config.setdefault((scope, selector), {})[name] = value
  return replaced


def command_line():
  """(--gin_file, --gin_param) of t5_mesh_transformer, or ([], []) outside the binary."""
  fl = flags.FLAGS
  if not fl.is_parsed() or "gin_file" not in fl:
    return [], []
  return list(fl.gin_file or ()), list(fl.gin_param or ())


def bound(name):
  try:
    gin.query_parameter(name)
    return True
  except ValueError:
    return False

"""mtf-switch: Switch Transformer layers for Mesh TensorFlow.

Importing the package (e.g. `t5_mesh_transformer --module_import=mtf_switch`) applies the TF
compatibility shim and upstream work-arounds, registers the gin configurables and puts
the package's, t5's and mesh-tensorflow's gin folders on gin's search path, so
`--gin_file=gin/models/switch_tiny.gin` (or `models/switch_tiny.gin`) resolves from any
directory. A fresh gin config also gets mesh-tensorflow's defaults.gin, as t5_mesh_transformer
parses it first: a Python user parses a model file and uses t5.models.MtfModel (README).
"""
import _mtf_switch_compat

_mtf_switch_compat.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin

from mtf_switch import attention
from mtf_switch import config
from mtf_switch import distill
from mtf_switch import finetune
from mtf_switch import guards
from mtf_switch import layers
from mtf_switch import patches
from mtf_switch.layers import SwitchFFN

config.add_search_paths()
if not gin.config._CONFIG:  # pylint: disable=protected-access  (a Python user's fresh config)
  config.parse_defaults()
patches.apply()
guards.apply()

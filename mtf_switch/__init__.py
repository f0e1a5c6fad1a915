"""mtf-switch: Switch Transformer layers for Mesh TensorFlow.

Importing the package (e.g. `t5_mesh_transformer --module_import=mtf_switch`) applies the TF
compatibility shim and upstream work-arounds, registers the gin configurables and adds the
package's gin folder to gin's search path, so `--gin_file=gin/models/switch_tiny.gin` (or
`models/switch_tiny.gin`) resolves from any directory.
"""
import os

import _mtf_switch_compat

_mtf_switch_compat.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin

from mtf_switch import attention
from mtf_switch import distill
from mtf_switch import finetune
from mtf_switch import layers
from mtf_switch import patches
from mtf_switch.layers import SwitchFFN

patches.apply()


def gin_dir():
  """The folder holding models/, runs/, ...: inside the package when installed, the repo's
  top-level gin/ in an editable install."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "gin")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "gin")


for _path in (gin_dir(), os.path.dirname(gin_dir())):
  if _path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
    gin.add_config_file_search_path(_path)

"""TF >= 2.13 compatibility for mesh-tensorflow 0.1.21, applied before it is imported.

mesh-tensorflow calls ``tensorflow.python.framework.ops.register_tensor_conversion_function``,
which TF 2.13 moved to ``tensor_conversion_registry``. The installed ``mtf_switch_compat.pth``
imports this module at interpreter start-up; it only adds a cheap import hook, so TensorFlow is
not imported until something imports ``mesh_tensorflow`` (for example the unmodified
``t5_mesh_transformer`` console script, which does so before ``--module_import`` runs).
"""
import importlib.abc
import sys


def apply():
  """Restores ``ops.register_tensor_conversion_function`` (idempotent)."""
  from tensorflow.python.framework import ops  # pylint: disable=g-import-not-at-top
  if not hasattr(ops, "register_tensor_conversion_function"):
    from tensorflow.python.framework import tensor_conversion_registry  # pylint: disable=g-import-not-at-top
    ops.register_tensor_conversion_function = (
        tensor_conversion_registry.register_tensor_conversion_function)


class _PatchBeforeMeshTensorflow(importlib.abc.MetaPathFinder):
  """Applies the shim the first time ``mesh_tensorflow`` is imported, then steps aside."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname == "mesh_tensorflow":
      sys.meta_path.remove(self)
      apply()
    return None  # The regular finders load the module.


def install():
  if "mesh_tensorflow" in sys.modules:
    apply()
  elif not any(isinstance(f, _PatchBeforeMeshTensorflow) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchBeforeMeshTensorflow())


install()

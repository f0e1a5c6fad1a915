"""The installed start-up hook: mesh-tensorflow imports in any interpreter of the environment
(as inside the unmodified t5_mesh_transformer), without importing TensorFlow at start-up."""
import os
import subprocess
import sys

from mtf_switch import config


def _python(code, cwd="/"):
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


def test_startup_hook_is_cheap_and_mesh_tensorflow_imports():
  proc = _python(
      "import sys\n"
      "assert '_mtf_switch_compat' in sys.modules, 'mtf_switch_compat.pth did not run'\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow imported at start-up'\n"
      "import mesh_tensorflow as mtf\n"
      "from tensorflow.python.framework import ops\n"
      "assert callable(ops.register_tensor_conversion_function)\n"
      "print(mtf.Dimension('experts', 8))\n")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Dimension(name='experts', size=8)" in proc.stdout


def test_gin_files_ship_with_the_package():
  root = config.gin_dirs()[0]
  for name in ("models/switch_tiny.gin", "models/t5_tiny.gin", "models/sparse/every_other_ffn.gin",
               "runs/pretrain_cpu.gin", "runs/pretrain_c4.gin", "layouts/tpu_v3_32.gin"):
    assert os.path.isfile(os.path.join(root, name)), name

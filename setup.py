"""mtf-switch: Switch Transformer / ST-MoE layers for Mesh TensorFlow and the t5 library."""
import os

import setuptools
from setuptools.command import build_py

_PTH = "mtf_switch_compat.pth"


class BuildPyWithPth(build_py.build_py):
  """Also installs mtf_switch_compat.pth, so the TF >= 2.13 shim for mesh-tensorflow is in
  effect in every interpreter of the environment (including t5_mesh_transformer)."""

  def run(self):
    super().run()
    # An editable wheel takes only what lands in its unpacked folder (install_lib there).
    dest = (self.get_finalized_command("install").install_lib
            if self.editable_mode else self.build_lib)
    self.copy_file(_PTH, os.path.join(dest, _PTH))

  def get_outputs(self, include_bytecode=True):
    return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, _PTH)]


# The known-good stack (DEVELOPERS.md); constraints.txt pins every transitive package too.
INSTALL_REQUIRES = [
    "tensorflow-cpu==2.15.1",
    "tensorflow-text==2.15.0",
    "mesh-tensorflow==0.1.21",
    "t5==0.9.4",
    "seqio-nightly==0.0.18.dev20250227",
    "tfds-nightly==4.9.2.dev202308090034",
    # mesh-tensorflow[transformer] (required by t5) pulls tensorflow-datasets, which shares the
    # tensorflow_datasets package with tfds-nightly: pin it to the same release so the files agree.
    "tensorflow-datasets==4.9.2",
    "tensorflow-metadata==1.14.0",
    "sentencepiece==0.2.0",
    "setuptools>=77,<81",
    "torch==2.13.0",  # t5.models imports torch; 2.13.0 is a local CPU build.
    "gin-config==0.5.0",
    "numpy==1.26.4",
    "matplotlib==3.8.4",  # benchmark plots and the routing report (mtf_switch.report)
]

setuptools.setup(
    name="mtf-switch",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=["mtf_switch", "mtf_switch.tasks", "mtf_switch.gin"],
    package_dir={"mtf_switch.gin": "gin", "mtf_switch.tasks": "tasks"},
    package_data={"mtf_switch.gin": ["**/*.gin"]},
    py_modules=["_mtf_switch_compat"],
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest==8.3.4", "pytest-xdist==3.6.1", "filelock"]},
    cmdclass={"build_py": BuildPyWithPth},
)

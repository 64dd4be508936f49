"""Only what pyproject.toml cannot say: install `hwattn-lm-eval.pth` into site-packages (see
hwattn_lm_eval_hook.py), for wheels and for editable installs alike."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hwattn-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            # An editable wheel is assembled from the install command's target directory.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(PTH, os.path.join(target, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})

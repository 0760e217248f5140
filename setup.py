"""Install emokernels and build its CPU kernels (the pybind11 module ``emokernels_cpu``).

The C++ sources (``csrc/cpu``, ``python_bindings``) hold no torch headers, so one plain g++
call per file builds them in seconds. The build is ``emokernels.ops._build.build_cpu()`` — the
same function that builds at first use — so an install and a later import agree on the cache
key (every source, header, flag and the Python version) and nothing is compiled twice. CUDA
sources build at first use on a CUDA machine. Install after requirements.txt with
``pip install --no-build-isolation -e .`` (see README).
"""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if os.environ.get("EMOKERNELS_SKIP_NATIVE_BUILD"):
            return
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, "-c", "from emokernels.ops._build import build_cpu; print('built', build_cpu().__file__)"]
        # A failed kernel build must not block the install: the ops then fall back to the
        # reference with a one-time warning naming the compiler error.
        r = subprocess.run(cmd, cwd=here, capture_output=True, text=True)
        print(r.stdout + r.stderr, file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithKernels})

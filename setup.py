"""Install emokernels and build its CPU kernels (the pybind11 module ``emokernels_cpu``).

The C++ sources (``csrc/``, ``python_bindings/``) hold no torch headers, so one plain g++ call
per file builds them in seconds. The build is ``emokernels.ops._build.build_cpu()`` — the same
function that builds at first use — so an install and a later import agree on the cache key
(every source text, header, flag and the Python version, not where the sources lie) and nothing
is compiled twice. CUDA sources build at first use on a CUDA machine. Install after
requirements.txt with ``pip install --no-build-isolation -e .`` (see README).

A wheel (``pip wheel .``, or ``pip install .``) carries the native sources: ``build_py`` copies
the whole of ``csrc/`` and ``python_bindings/`` into the built package as ``emokernels/csrc/``
and ``emokernels/python_bindings/``, where :func:`emokernels.ops._build.native_source_root`
looks when the package is not in a checkout. The sdist carries them through ``MANIFEST.in``.
"""
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

NATIVE_SOURCE_DIRS = ("csrc", "python_bindings")
# Build products and caches that may sit in a checkout's source folders; never shipped.
_NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.py[co]", "*.o", "*.so", "*.tmp")


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        if not getattr(self, "editable_mode", False):  # an editable install reads the checkout
            self._copy_native_sources(here)
        if os.environ.get("EMOKERNELS_SKIP_NATIVE_BUILD"):
            return
        cmd = [sys.executable, "-c", "from emokernels.ops._build import build_cpu; print('built', build_cpu().__file__)"]
        # A failed kernel build must not block the install: the ops then fall back to the
        # reference with a one-time warning naming the compiler error.
        r = subprocess.run(cmd, cwd=here, capture_output=True, text=True)
        print(r.stdout + r.stderr, file=sys.stderr)

    def _copy_native_sources(self, here):
        pkg_dir = os.path.join(self.build_lib, "emokernels")
        for name in NATIVE_SOURCE_DIRS:
            src, dst = os.path.join(here, name), os.path.join(pkg_dir, name)
            if not os.path.isdir(src):
                raise FileNotFoundError(f"emokernels: native source folder {src} is missing; "
                                        f"a wheel without it cannot build its kernels")
            # build/lib outlives a build: a file renamed or deleted in the checkout must not
            # linger in the next wheel (the native build compiles every file it finds).
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=_NOT_SHIPPED)


setup(cmdclass={"build_py": BuildPyWithKernels})

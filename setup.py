"""Build the CPU kernels as a pybind11 extension (``emokernels.emokernels_cpu``).

The C++ sources under ``csrc/cpu`` hold no torch headers (raw pointers, OpenMP), so the module
compiles in seconds. CUDA sources (``csrc/cuda``) are built at first use on a CUDA machine by
``emokernels.ops._build``, which also rebuilds the CPU module when sources changed.
Install with ``pip install --no-build-isolation -e .`` after requirements.txt (see README).
"""
from glob import glob

from setuptools import setup

ext_modules = []
try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    sources = sorted(glob("python_bindings/cpu_module.cpp") + glob("python_bindings/cpu/*.cpp") + glob("csrc/cpu/*.cpp"))
    if sources:
        ext_modules.append(
            Pybind11Extension(
                "emokernels.emokernels_cpu",
                sources,
                include_dirs=["csrc/include", "csrc"],
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
                cxx_std=17,
            )
        )
    cmdclass = {"build_ext": build_ext}
except ImportError:  # no pybind11: the kernels are built at first use instead
    cmdclass = {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

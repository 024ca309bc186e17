"""Builds the optional C++ extension ``cloq_engine._C`` (CPU pack/unpack and dequant ops).

The package works without it (the torch reference backend); set CLOQ_NO_EXT=1 to skip the build.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("CLOQ_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
        if sources:
            ext_modules = [
                CppExtension(
                    "cloq_engine._C",
                    sources,
                    depends=sorted(
                        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".h", ".inc"))
                    ),
                    extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
                    extra_link_args=["-fopenmp"],
                )
            ]
            cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    except ImportError:  # torch not installed yet: build the pure-Python package
        pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)

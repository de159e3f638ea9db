"""Builds rln_fast._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Switches (printed at build time):
  RLN_FAST_FORCE_CUDA=1  build the CUDA kernels or fail (e.g. on a machine without a GPU)
  RLN_FAST_SKIP_CUDA=1   never build the CUDA kernels
  RLN_FAST_PORTABLE=1    no -march=native for the CPU kernels (for binaries run elsewhere)
  RLN_FAST_DEBUG=1       -O0 -g
"""

import glob
import os
import shutil

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_decision() -> tuple[bool, str]:
    import torch

    if _flag("RLN_FAST_SKIP_CUDA"):
        return False, "RLN_FAST_SKIP_CUDA is set"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    ):
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if reasons:
        if _flag("RLN_FAST_FORCE_CUDA"):
            raise RuntimeError("RLN_FAST_FORCE_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME}"


def _extension():
    with_cuda, why = _cuda_decision()
    debug = _flag("RLN_FAST_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++17", "-fopenmp"]
    if not _flag("RLN_FAST_PORTABLE"):
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/torch/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc", "cpu")]
    kwargs = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "default")
        defines = ["-DRLN_FAST_WITH_CUDA", f'-DRLN_FAST_CUDA_ARCH="{arch}"']
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        print(f"rln_fast: building CPU + CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST={arch})")
        return cpp_extension.CUDAExtension(
            "rln_fast._C",
            sources,
            extra_compile_args={"cxx": cxx + defines, "nvcc": opt + ["-std=c++17", "-lineinfo"] + defines},
            **kwargs,
        )
    print(f"rln_fast: building CPU kernels only ({why})")
    return cpp_extension.CppExtension("rln_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

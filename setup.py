"""Build script: packages `nextrec_fast` (with `kernels/` and `csrc/` shipped inside it) and
builds the C++ (and, where CUDA_HOME is set, CUDA) extension `nextrec_fast._C` when torch is
importable at build time. Install with `pip install --no-build-isolation .` so that the
extension is compiled against the torch you run, not a second copy pulled in by pip.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("NEXTREC_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
    except ImportError:
        print("nextrec-fast: torch not importable at build time; the C++ extension is skipped "
              "(reference and PyTorch paths still work; the JIT build runs on first use)")
        return [], {}
    from torch.utils import cpp_extension
    if CUDA_HOME and not os.path.isdir(os.path.join(CUDA_HOME, "lib64")) \
            and os.path.isdir("/usr/local/cuda/lib64"):
        # torch derives CUDA_HOME from the nvcc on PATH; a wrapper script (/usr/local/bin/nvcc)
        # makes that /usr/local, which has no CUDA libraries to link against.
        CUDA_HOME = cpp_extension.CUDA_HOME = "/usr/local/cuda"
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    use_cuda = bool(cu) and CUDA_HOME is not None and torch.version.cuda is not None \
        and os.environ.get("NEXTREC_FAST_NO_CUDA") != "1"
    # -ffp-contract=off: batch_norm_act recomputes its ReLU mask in the backward and needs
    # the forward's arithmetic exactly (no FMA contraction in one place and not the other).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    define = []
    if use_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            # No GPU at build time (CI): compile for Hopper and a portable PTX target.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = CUDAExtension(
            "nextrec_fast._C", cpp + cu,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define + [("NEXTREC_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "nextrec_fast._C", cpp,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["nextrec_fast", "nextrec_fast.*"]) + ["nextrec_fast.kernels", "nextrec_fast.csrc"],
    # kernels/ and csrc/ live at the top level of the repository (the user's layout) but
    # ship inside the package: `import nextrec_fast.kernels`, never a top-level `kernels`.
    package_dir={"nextrec_fast": "nextrec_fast", "nextrec_fast.kernels": "kernels", "nextrec_fast.csrc": "csrc"},
    package_data={"nextrec_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

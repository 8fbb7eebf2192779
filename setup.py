"""Builds one extension, ``quantkit._C``: the CPU kernels always, the CUDA kernels when CUDA is available or forced.

Environment knobs
    QUANTKIT_CUDA=auto|1|0   auto: build CUDA kernels when torch is a CUDA build and nvcc is found;
                             1: always (a CPU-only machine compiles and links every .cu file); 0: never.
    QUANTKIT_CUDA_ARCHS      semicolon list of compute capabilities, default "80;90" (explicit -gencode: a
                             GPU-less builder cannot probe one, and nvcc 13 starts at sm_75).
    QUANTKIT_BUILD_EXT=0     skip the extension entirely (every op then runs its pure-PyTorch reference).
    DEBUG=1                  -O0 -g instead of -O3 -g0.

The extension uses only torch's stable C ABI (torch/csrc/stable), so the same sources build against the CPU
wheel here and the CUDA wheel of torch 2.11 on a GPU machine. Build with
``pip install --no-build-isolation -e .`` after installing torch.
"""
import glob
import os
import shutil
import subprocess

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:  # torch is not a build requirement on purpose (see pyproject.toml)
    raise SystemExit(
        "quantkit: torch is not installed. Run `pip install torch==2.13.0` (or your CUDA build) first, then "
        "`pip install --no-build-isolation -e .`"
    ) from error

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.getenv("DEBUG", "0") == "1"
BUILD_EXT = os.getenv("QUANTKIT_BUILD_EXT", "1") != "0"
CUDA_MODE = os.getenv("QUANTKIT_CUDA", "auto")
ARCHS = [a.strip() for a in os.getenv("QUANTKIT_CUDA_ARCHS", "80;90").split(";") if a.strip()]
if CUDA_MODE not in ("auto", "0", "1"):
    raise SystemExit(f"quantkit: QUANTKIT_CUDA must be auto, 1 or 0, got {CUDA_MODE!r}")


def _torch_version_hex() -> str:
    """TORCH_TARGET_VERSION for the installed torch, capped at 2.13 (the newest stable-ABI features we use)."""
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    major, minor = min((major, minor), (2, 13))
    return f"0x{major:02x}{minor:02x}000000000000"


def _find_cuda_home():
    """CUDA_HOME / CUDA_PATH, else the toolkit around nvcc on PATH, else the usual /usr/local/cuda* locations.

    nvcc on PATH may be a wrapper script (this machine: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc),
    so a candidate counts only when it holds both bin/nvcc and include/cuda_runtime.h.
    """
    candidates = [os.getenv("CUDA_HOME"), os.getenv("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_MODE == "1" and CUDA_HOME is None:
    raise SystemExit("quantkit: QUANTKIT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
WITH_CUDA = CUDA_MODE == "1" or (CUDA_MODE == "auto" and torch.version.cuda is not None and CUDA_HOME is not None)
# A CUDA torch exports the CUDA stream shim; a CPU torch only the device-generic one (2.13+).
TORCH_HAS_CUDA = torch.version.cuda is not None
if WITH_CUDA and not TORCH_HAS_CUDA and _torch_version_hex() < "0x020d":
    raise SystemExit(f"quantkit: compiling the CUDA kernels against a CPU build of torch needs torch >= 2.13 (the "
                     f"stream's native handle), found {torch.__version__}; use QUANTKIT_CUDA=0 or a CUDA torch")

OPT = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
DEFINES = [f"-DTORCH_TARGET_VERSION={_torch_version_hex()}"]
if WITH_CUDA:
    DEFINES.append("-DQUANTKIT_WITH_CUDA")
    if TORCH_HAS_CUDA:
        DEFINES += ["-DUSE_CUDA", "-DQUANTKIT_CUDA_STREAM_SHIM"]


class _BuildWithNvcc(BuildExtension):
    """Compiles the .cu files with nvcc directly and links the objects in.

    torch's own CUDA logic cannot be used on a CPU wheel (it has no CUDA_HOME and no libtorch_cuda to link), and
    the kernels in csrc/cuda are torch-free, so plain nvcc is all they need. The .cu sources are taken out of the
    extension before BuildExtension.build_extensions looks at them (it would demand torch's CUDA_HOME), compiled in
    parallel (an object newer than every csrc/cuda source and header is reused), and linked as extra objects.
    """

    def build_extensions(self):
        for ext in self.extensions:
            ext.cu_sources = [s for s in ext.sources if s.endswith(".cu")]
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        super().build_extensions()

    def build_extension(self, ext):
        cu_sources = getattr(ext, "cu_sources", [])
        if cu_sources:
            from concurrent.futures import ThreadPoolExecutor

            out_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(out_dir, exist_ok=True)
            newest_input = max(os.path.getmtime(p) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*")))
            tag = "sm" + "_".join(ARCHS) + ("_debug" if DEBUG else "")  # a cached object is reused only as built
            objects = [os.path.join(out_dir, f"{os.path.basename(src)}.{tag}.o") for src in cu_sources]
            jobs = max(1, min(len(cu_sources), int(os.getenv("MAX_JOBS", os.cpu_count() or 1))))
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(lambda pair: self._nvcc(*pair, newest_input), zip(cu_sources, objects)))
            ext.extra_objects.extend(objects)
        super().build_extension(ext)

    @staticmethod
    def _nvcc(src, obj, newest_input):
        if os.path.exists(obj) and os.path.getmtime(obj) >= newest_input:
            return
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        cmd = [os.path.join(CUDA_HOME, "bin", "nvcc"), "-c", src, "-o", obj, "-std=c++17", "-Xcompiler", "-fPIC",
               "--expt-relaxed-constexpr", f"-I{os.path.join(HERE, 'csrc')}", *gencode,
               *(["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-DNDEBUG"])]  # nvcc has no -g0
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd)


def _extensions():
    if not BUILD_EXT:
        return []
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    library_dirs, libraries = [], []
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs.append(os.path.join(CUDA_HOME, "include"))
        lib_dir = os.path.join(CUDA_HOME, "lib64")
        library_dirs.append(lib_dir if os.path.isdir(lib_dir) else os.path.join(CUDA_HOME, "lib"))
        libraries += ["cudart_static", "rt", "pthread", "dl"]
        if TORCH_HAS_CUDA:
            libraries.append("torch_cuda")
    return [
        CppExtension(
            "quantkit._C",
            sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            extra_compile_args={"cxx": [*OPT, *DEFINES, "-std=c++17"]},
            py_limited_api=True,
        )
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildWithNvcc.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

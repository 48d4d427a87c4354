"""The native CPU kernels (``csrc/sgd_sai_cpu.c``): built once per process with the system C compiler, called through ctypes.

Two kernels live there: the whole SGD-SaI update of a block in one loop (used by
:mod:`sai_hf.cpu_update`) and the float64 sums of the first step's g-SNR for many gradients in one
call (used by :mod:`sai_hf.gsnr`). Their equations are in the C file.

Why C through ctypes, not torch ops or ``torch.compile``: torch has no kernel for SGD with decoupled
decay, and inductor's loop (the previous version of the update) was 10-25% slower than torch's fused
SGD on 0.6-2.4M-entry blocks, cost ~30 us of host time per call and 3-11 s of compilation per
process. The C loop matches torch's fused kernel (measured in :mod:`sai_hf.cpu_update`), a ctypes
call costs ~3 us, and the build takes 0.1-0.4 s.

**Build.** Into a temporary directory (removed as soon as the library is loaded), with the compiler
named by ``$CC``, else ``cc``, ``gcc`` or ``clang``, for this machine's CPU (``-march=native``: the
build is never shared, so a cluster with mixed CPUs cannot get another machine's instructions). No
``-ffast-math``, and ``-ffp-contract=off``: each floating-point operation is rounded as in the
Triton kernel.

**Threads.** Where the compiler is GCC and torch's threads are libgomp's (every Linux wheel of
torch), the library is built with ``-fopenmp``: it links the libgomp that torch already loaded (one
thread pool in the process) and each call runs on ``torch.get_num_threads()`` threads. Elsewhere it
is built single-threaded and :meth:`NativeLibrary.usable` only while torch runs on one thread (with
more, torch's own threaded kernels are faster).

**Where it cannot run** (no compiler, a failed build: one RuntimeWarning names the cause;
``SAI_HF_CPU_KERNEL=0``: silently), :func:`available` is False and the callers keep their torch-ops
paths: the same equations, more passes over memory. :func:`readable` says which tensors C may be
handed at all: tensors whose memory is real.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["NativeLibrary", "available", "library", "readable", "DISABLE_VARIABLE", "SOURCE"]

#: The C source of the kernels.
SOURCE = Path(__file__).with_name("csrc") / "sgd_sai_cpu.c"
#: Set to ``0`` to keep every CPU block on the torch-ops paths (a comparison baseline, or a workaround).
DISABLE_VARIABLE = "SAI_HF_CPU_KERNEL"
#: Always: optimised, no contraction (each operation rounded as in the Triton kernel), a shared object.
_FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]
_POINTER, _I64, _INT, _U32, _F32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float, ctypes.c_double
#: The C functions: argument types (``threads`` last) and result type.
SIGNATURES = {
    "sgd_sai_f32": ([_POINTER] * 3 + [_I64, _INT, _INT] + [_F32] * 4 + [_INT], None),
    "sgd_sai_f64": ([_POINTER] * 3 + [_I64, _INT, _INT] + [_F64] * 4 + [_INT], None),
    "sgd_sai_f32_bf16": ([_POINTER] * 3 + [_I64, _INT, _INT] + [_F32] * 4 + [_U32, _INT], None),
    "block_statistics_f32": ([_POINTER, _POINTER, _I64, _I64, _POINTER, _INT], _INT),
}


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (split like a shell word list: ``ccache gcc`` works), else
    the first of ``cc``, ``gcc``, ``clang`` on ``PATH``; ``None`` if there is none."""
    if os.environ.get("CC", "").strip():
        command = shlex.split(os.environ["CC"])
        found = shutil.which(command[0])
        return [found, *command[1:]] if found else None
    return next(([path] for path in map(shutil.which, ["cc", "gcc", "clang"]) if path), None)


def _is_gcc(compiler: list[str]) -> bool:
    """Whether ``compiler`` is GCC (its ``-fopenmp`` links libgomp; clang's links LLVM's libomp)."""
    macros = subprocess.run([*compiler, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True, check=True).stdout
    return "__GNUC__" in macros and "__clang__" not in macros


def _torch_threads_are_libgomp() -> bool:
    """Whether torch's intra-op threads are GNU OpenMP's (read from this process's loaded libraries)."""
    if "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"):
        return False
    with open("/proc/self/maps") as maps:
        return any("libgomp" in line for line in maps)


def _accepted(compiler: list[str], flags: list[str]) -> list[str]:
    """The ``flags`` that ``compiler`` accepts (each tried alone on an empty file)."""
    return [flag for flag in flags if subprocess.run([*compiler, flag, "-E", "-x", "c", os.devnull], capture_output=True).returncode == 0]


def _machine_flag() -> str:
    """This CPU's instructions: ``-march=native`` on x86, ``-mcpu=native`` elsewhere (GCC and clang on ARM)."""
    return "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i686") else "-mcpu=native"


class NativeLibrary:
    """The kernels built for this process (:meth:`build`), or why there are none (``failure``)."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.threaded = False
        self.functions: dict[str, ctypes._CFuncPtr] = {}

    def build(self) -> None:
        """Compile :data:`SOURCE` and load it; on failure record why and warn once."""
        try:
            compiler = _compiler()
            if compiler is None:
                named = os.environ.get("CC", "").strip()
                raise OSError(f"CC={named!r} is not on PATH" if named else "no C compiler: set CC or install gcc or clang")
            self.threaded = _torch_threads_are_libgomp() and _is_gcc(compiler)
            optional = [_machine_flag()] + ([] if self.threaded else ["-fopenmp-simd"])
            flags = _FLAGS + (["-fopenmp"] if self.threaded else []) + _accepted(compiler, optional)
            with tempfile.TemporaryDirectory(prefix="sai_hf_cpu_") as directory:  # removed once loaded
                path = Path(directory) / "sgd_sai_cpu.so"
                done = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(path)], capture_output=True, text=True)
                if done.returncode != 0:
                    lines = done.stderr.strip().splitlines()
                    raise OSError(f"{Path(compiler[0]).name} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
                loaded = ctypes.CDLL(str(path))
            for name, (argtypes, restype) in SIGNATURES.items():
                function = getattr(loaded, name)
                function.argtypes, function.restype = argtypes, restype
                self.functions[name] = function
        except (OSError, subprocess.SubprocessError, AttributeError) as err:
            self.functions = {}
            self.failure = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"sai_hf: the native CPU kernels are not available here ({self.failure}); CPU blocks take the "
                "torch-ops paths (same equations, more passes over memory)",
                RuntimeWarning,
                stacklevel=3,
            )

    def usable(self) -> bool:
        """Whether the kernels run here now: built, and threaded or torch on one thread."""
        return bool(self.functions) and (self.threaded or torch.get_num_threads() == 1)

    def call(self, name: str, *arguments: object) -> int | None:
        """Run C function ``name`` with ``arguments`` and this process's torch thread count; its result."""
        return self.functions[name](*arguments, torch.get_num_threads())


@functools.cache
def library() -> NativeLibrary:
    """This process's kernels, built on the first call (unless ``SAI_HF_CPU_KERNEL=0``)."""
    built = NativeLibrary()
    if os.environ.get(DISABLE_VARIABLE, "1") != "0":
        built.build()
    else:
        built.failure = f"disabled by {DISABLE_VARIABLE}=0"
    return built


def available() -> bool:
    """Whether the native kernels run in this process now (builds them on the first call)."""
    return library().usable()


def readable(t: torch.Tensor) -> bool:
    """Whether C may read and write ``t``'s elements through ``t.data_ptr()``: a CPU tensor whose
    class does not dispatch on its own (``FakeTensor``, wrapper subclasses and ``DTensor`` have no
    memory of their own there: their pointer is null or not theirs) and a non-null pointer."""
    return (
        t.device.type == "cpu"
        and type(t).__torch_dispatch__ is torch.Tensor.__torch_dispatch__
        and t.data_ptr() != 0
    )

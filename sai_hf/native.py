"""The native CPU kernels (``csrc/sgd_sai_cpu.c``, equations there): the whole update of a block in one loop
(:mod:`sai_hf.cpu_update`) and the float64 first-step g-SNR sums of many gradients in one call (:mod:`sai_hf.gsnr`),
built once per process with the system C compiler and called through ctypes: torch has no kernel for SGD with
decoupled decay, and an inductor loop was slower than torch's fused SGD and compiled for seconds in every process.

**Build.** Once per process (under a lock), into a temporary directory removed once the library is loaded, under
``$SAI_HF_BUILD_DIR`` if set (for a ``noexec`` ``$TMPDIR``), with ``$CC`` (split like a shell word list), else ``cc``,
``gcc`` or ``clang``, with ``-march=native`` (the build is never shared), no ``-ffast-math`` and ``-ffp-contract=off``
(each operation rounded as in the Triton kernel). Where the compiler is GCC and torch's threads are libgomp's, it is
built with ``-fopenmp`` and runs on ``torch.get_num_threads()`` threads; otherwise single-threaded, and
:meth:`NativeLibrary.usable` only while torch runs on one thread.

**Where it cannot run** (no compiler, a bad ``$CC``, a failed build: one RuntimeWarning naming the cause;
``SAI_HF_CPU_KERNEL=0``/``false``/``no``/``off``: silently; another value than those and ``1``/``true``/``yes``/``on``:
``ValueError`` naming the variable), :func:`available` is False and callers keep their torch-ops paths (same
equations, more passes over memory).
"""

from __future__ import annotations

import ctypes
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["NativeLibrary", "available", "library", "readable", "BUILD_DIR_VARIABLE", "DISABLE_VARIABLE", "SOURCE"]

#: The C source of the kernels.
SOURCE = Path(__file__).with_name("csrc") / "sgd_sai_cpu.c"
#: Set to ``0`` (or ``false``, ``no``, ``off``) to keep every CPU block on the torch-ops paths.
DISABLE_VARIABLE = "SAI_HF_CPU_KERNEL"
_TRUE, _FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")
#: A directory to build in instead of the system's temporary directory (which may be ``noexec``).
BUILD_DIR_VARIABLE = "SAI_HF_BUILD_DIR"
#: Seconds a compiler probe and the build may take (a ``$CC`` that hangs must not hang the optimizer).
_PROBE_SECONDS, _BUILD_SECONDS = 60, 600
#: Keyword arguments of every compiler run: no stdin, undecodable output replaced, not raised.
_RUN = dict(stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
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
        try:
            command = shlex.split(os.environ["CC"])
        except ValueError as err:  # e.g. an unbalanced quote
            raise OSError(f"CC={os.environ['CC']!r} cannot be split into a command ({err})") from None
        found = shutil.which(command[0]) if command and command[0] else None
        return [found, *command[1:]] if found else None
    return next(([path] for path in map(shutil.which, ["cc", "gcc", "clang"]) if path), None)


def _is_gcc(compiler: list[str]) -> bool:
    """Whether ``compiler`` is GCC (its ``-fopenmp`` links libgomp; clang's links LLVM's libomp)."""
    macros = subprocess.run([*compiler, "-dM", "-E", "-x", "c", os.devnull], **_RUN, check=True, timeout=_PROBE_SECONDS).stdout
    return "__GNUC__" in macros and "__clang__" not in macros


def _torch_threads_are_libgomp() -> bool:
    """Whether torch's intra-op threads are GNU OpenMP's (read from this process's loaded libraries)."""
    if "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"):
        return False
    with open("/proc/self/maps") as maps:
        return any("libgomp" in line for line in maps)


def _accepted(compiler: list[str], flags: list[str]) -> list[str]:
    """The ``flags`` that ``compiler`` accepts (each tried alone on an empty file)."""
    return [
        flag for flag in flags
        if subprocess.run([*compiler, flag, "-E", "-x", "c", os.devnull], **_RUN, timeout=_PROBE_SECONDS).returncode == 0
    ]  # fmt: skip


def _compiler_error(stderr: str, returncode: int) -> str:
    """The compiler's first error line and its last line (the first error is the cause; the last
    line is often only a summary such as ``compilation terminated.``)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return f"exit status {returncode}"
    first = next((line for line in lines if "error" in line.lower()), lines[0])
    return first if first == lines[-1] else f"{first} [...] {lines[-1]}"


def _build_root() -> str | None:
    """``$SAI_HF_BUILD_DIR`` (checked: an existing directory), else ``None`` (the system's temporary directory)."""
    named = os.environ.get(BUILD_DIR_VARIABLE, "").strip()
    if not named:
        return None
    if not os.path.isdir(named):
        raise OSError(f"{BUILD_DIR_VARIABLE}={named!r} is not an existing directory")
    return named


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
            x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
            optional = ["-march=native" if x86 else "-mcpu=native"] + ([] if self.threaded else ["-fopenmp-simd"])  # ARM: -mcpu
            flags = _FLAGS + (["-fopenmp"] if self.threaded else []) + _accepted(compiler, optional)
            with tempfile.TemporaryDirectory(prefix="sai_hf_cpu_", dir=_build_root()) as directory:  # removed once loaded
                path = Path(directory) / "sgd_sai_cpu.so"
                done = subprocess.run([*compiler, *flags, str(SOURCE), "-o", str(path)], **_RUN, timeout=_BUILD_SECONDS)
                if done.returncode != 0:
                    raise OSError(f"{Path(compiler[0]).name} failed: {_compiler_error(done.stderr, done.returncode)}")
                try:
                    loaded = ctypes.CDLL(str(path))
                except OSError as err:  # e.g. "failed to map segment from shared object": a noexec TMPDIR
                    raise OSError(
                        f"the built library in {directory} cannot be loaded ({err}); if that file system is mounted "
                        f"noexec, set {BUILD_DIR_VARIABLE} to a directory where code may run"
                    ) from None
            for name, (argtypes, restype) in SIGNATURES.items():
                function = getattr(loaded, name)
                function.argtypes, function.restype = argtypes, restype
                self.functions[name] = function
        except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as err:
            self.functions = {}
            self.failure = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"sai_hf: the native CPU kernels are not available here ({self.failure}); CPU blocks take the "
                f"torch-ops paths (same equations, more passes over memory). Settings: CC (the compiler), "
                f"{BUILD_DIR_VARIABLE} (where to build), {DISABLE_VARIABLE}=0 (do not build)",
                RuntimeWarning,
                stacklevel=3,
            )

    def usable(self) -> bool:
        """Whether the kernels run here now: built, and threaded or torch on one thread."""
        return bool(self.functions) and (self.threaded or torch.get_num_threads() == 1)

    def call(self, name: str, *arguments: object) -> int | None:
        """Run C function ``name`` with ``arguments`` and this process's torch thread count; its result."""
        return self.functions[name](*arguments, torch.get_num_threads())


def _enabled() -> bool:
    """``$SAI_HF_CPU_KERNEL`` read like the other boolean settings (unset or empty: enabled);
    ``ValueError`` naming the variable for a value it does not know."""
    text = os.environ.get(DISABLE_VARIABLE, "")
    lowered = text.strip().lower()
    if not lowered or lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(
        f"Invalid environment variable {DISABLE_VARIABLE}={text!r}: expected 0/false/no/off (the torch-ops paths) "
        "or 1/true/yes/on (the C kernels, the default)"
    )


_LOCK = threading.Lock()
_LIBRARY: NativeLibrary | None = None


def library() -> NativeLibrary:
    """This process's kernels, built on the first call (unless ``SAI_HF_CPU_KERNEL`` disables them);
    threads calling it at once wait for that one build. ``library.cache_clear()`` forgets it."""
    global _LIBRARY
    built = _LIBRARY
    if built is None:
        with _LOCK:
            if _LIBRARY is None:
                fresh = NativeLibrary()
                if _enabled():
                    fresh.build()
                else:
                    fresh.failure = f"disabled by {DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]!r}"
                _LIBRARY = fresh
            built = _LIBRARY
    return built


def _cache_clear() -> None:
    global _LIBRARY
    with _LOCK:
        _LIBRARY = None


library.cache_clear = _cache_clear  # type: ignore[attr-defined]  (as functools.cache offered)


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

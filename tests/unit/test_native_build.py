"""Building and loading the native CPU kernels (``sai_hf.native``): no compiler, a failing or odd
``$CC``, an unloadable build, a single-threaded build, concurrent construction, and
``$SAI_HF_CPU_KERNEL``; wherever the kernels cannot run, the slab path gives the for-loop's result."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from _triton_reference import run_steps

from sai_hf import SGDSaI, cpu_update, native
from sai_hf.functional import sgd_sai

needs_native = pytest.mark.skipif(not native.available(), reason=f"no native CPU kernels here: {native.library().failure}")

#: The native loop's edges (as in test_cpu_update.py).
SHAPES = [(1,), (700, 1001), (65535,), (3, 65537)]


def update(params, grads, buffers, step_sizes, **kwargs):
    cpu_update.cpu_sgd_sai_(params, grads, buffers, step_sizes, **kwargs)


def _slab_path_result(monkeypatch, kernels: native.NativeLibrary, match: str | None):
    """Three bf16-momentum steps with ``kernels`` in place of the process's loop: the warning
    (``match``, once), the slab path taken, and the result equal to the for-loop path."""
    monkeypatch.setattr(native, "library", lambda: kernels)
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(70_000, generator=gen)
    grads = [torch.randn(p.shape, generator=gen) for _ in range(3)]
    got_p, got_m, want_p, want_m = p.clone(), [None], p.clone(), [None]
    kwargs = dict(lr=0.01, momentum=0.9, weight_decay=0.1, maximize=False, momentum_dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_update, "cpu_sgd_sai_", lambda *a, **k: pytest.fail("the native loop ran"))
    with pytest.warns(RuntimeWarning, match=match) if match else warnings.catch_warnings():
        kernels.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at the build
        for step, g in enumerate(grads):
            sgd_sai([got_p], [g], got_m, [2.0], **kwargs, steps=[step])
    for step, g in enumerate(grads):
        sgd_sai([want_p], [g], want_m, [2.0], **kwargs, foreach=False, steps=[step])
    torch.testing.assert_close(got_p, want_p, rtol=1e-5, atol=1e-5)  # lerp vs mu m + (1 - mu) g roundings
    torch.testing.assert_close(got_m[0].float(), want_m[0].float(), rtol=0, atol=0.05)

@needs_native
def test_no_compiler_warns_once_and_keeps_the_slab_path(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    kernels = native.NativeLibrary()
    _slab_path_result(monkeypatch, kernels, r"native CPU kernels are not available here \(OSError: no C compiler: set CC")
    assert not kernels.usable()

@needs_native
def test_a_failing_compiler_is_named(monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: out of memory' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(native, "_is_gcc", lambda compiler: True)
    kernels = native.NativeLibrary()
    _slab_path_result(monkeypatch, kernels, r"\(OSError: cc failed: cc: fatal error: out of memory\)")

@needs_native
def test_a_single_threaded_build_runs_only_when_torch_does(monkeypatch):
    """Where the loop cannot share torch's thread pool it is built without OpenMP: usable with
    ``torch.set_num_threads(1)``, not with more threads (torch's own kernels would be faster)."""
    monkeypatch.setattr(native, "_torch_threads_are_libgomp", lambda: False)
    kernels = native.NativeLibrary()
    kernels.build()
    assert not kernels.threaded and kernels.failure is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.usable()
        monkeypatch.setattr(native, "library", lambda: kernels)
        run_steps(update, SHAPES, buf_dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert kernels.usable() == (threads == 1)

@needs_native
def test_disabled_by_the_environment_variable():
    code = "from sai_hf import cpu_update, native; import torch; print(native.available(), cpu_update.takes(torch.zeros(4), torch.zeros(4), torch.bfloat16))"
    env = {"SAI_HF_CPU_KERNEL": "0", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]

@needs_native
def test_construction_under_warnings_as_errors_builds():
    native.library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SGDSaI([torch.nn.Parameter(torch.zeros(10))], lr=1e-3, weight_decay=0.1)
    assert native.available(), native.library().failure


# --------------------------------------------------------------------------- the build's inputs (found attacking the build)
@pytest.fixture
def fresh_native():
    """``sai_hf.native`` with its per-process library forgotten before and after the test."""
    from sai_hf import native

    native.library.cache_clear()
    yield native
    native.library.cache_clear()


def test_cc_with_an_unbalanced_quote_warns_and_the_optimizer_still_builds(fresh_native, monkeypatch):
    from sai_hf import SGDSaI

    monkeypatch.setenv("CC", "gcc -DNAME='x")
    with pytest.warns(RuntimeWarning, match=r"CC=.*cannot be split.*No closing quotation.*torch-ops"):
        opt = SGDSaI([torch.nn.Parameter(torch.ones(4))], lr=1e-3)
    assert not fresh_native.available()
    opt.param_groups[0]["params"][0].grad = torch.randn(4)
    opt.step()  # on the torch-ops path


def test_failed_compile_quotes_the_first_error_line(fresh_native, monkeypatch, tmp_path):
    import shutil

    gcc = shutil.which("gcc") or pytest.skip("no gcc")
    fake = tmp_path / "fakecc"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *" -o "*) echo "sgd_sai_cpu.c:3:1: error: the first problem" >&2; '
        'echo "sgd_sai_cpu.c:9:1: note: detail" >&2; echo "compilation terminated." >&2; exit 1;; esac\n'
        f'exec {gcc} "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(RuntimeWarning) as caught:
        fresh_native.library()
    (message,) = [str(w.message) for w in caught if "native CPU kernels" in str(w.message)]
    assert "error: the first problem" in message and "compilation terminated." in message


def test_unloadable_build_names_the_build_directory_setting(fresh_native, monkeypatch, tmp_path):
    """A noexec TMPDIR: the library builds but cannot be mapped; the warning names SAI_HF_BUILD_DIR,
    which moves the build."""
    import ctypes

    real = ctypes.CDLL

    def noexec(path, *args, **kwargs):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(fresh_native.ctypes, "CDLL", noexec)
    with pytest.warns(RuntimeWarning, match="failed to map segment.*set SAI_HF_BUILD_DIR"):
        fresh_native.library()
    fresh_native.library.cache_clear()
    loaded_from = []
    monkeypatch.setattr(fresh_native.ctypes, "CDLL", lambda path, *a, **k: loaded_from.append(path) or real(path, *a, **k))
    monkeypatch.setenv("SAI_HF_BUILD_DIR", str(tmp_path))
    assert fresh_native.library().failure is None
    assert loaded_from and loaded_from[0].startswith(str(tmp_path))
    fresh_native.library.cache_clear()
    monkeypatch.setenv("SAI_HF_BUILD_DIR", str(tmp_path / "missing"))
    with pytest.warns(RuntimeWarning, match="SAI_HF_BUILD_DIR=.*missing.*not an existing directory"):
        fresh_native.library()


def test_threads_constructing_at_once_build_once(fresh_native, monkeypatch):
    import threading
    import time

    builds = []

    def slow_build(self):
        builds.append(threading.get_ident())
        time.sleep(0.2)

    monkeypatch.setattr(fresh_native.NativeLibrary, "build", slow_build)
    barrier = threading.Barrier(4)
    results = []

    def construct():
        barrier.wait()
        results.append(fresh_native.library())

    threads = [threading.Thread(target=construct) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({id(r) for r in results}) == 1


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "off", "no", " 0", "0 "])
def test_cpu_kernel_variable_is_read_like_a_boolean(fresh_native, monkeypatch, value):
    monkeypatch.setattr(fresh_native.NativeLibrary, "build", lambda self: pytest.fail("built although disabled"))
    monkeypatch.setenv("SAI_HF_CPU_KERNEL", value)
    assert not fresh_native.available() and fresh_native.library().failure.startswith("disabled by SAI_HF_CPU_KERNEL")


@pytest.mark.parametrize("value", ["maybe", "2", "disable"])
def test_cpu_kernel_variable_of_unknown_value_is_an_error_naming_it(fresh_native, monkeypatch, value):
    monkeypatch.setenv("SAI_HF_CPU_KERNEL", value)
    with pytest.raises(ValueError, match=f"SAI_HF_CPU_KERNEL={value!r}"):
        fresh_native.library()

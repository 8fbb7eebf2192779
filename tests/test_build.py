"""The build and the loader: which kernels the extension registers, and how quantkit behaves without it.

Driven by the environment `make test` sets: QUANTKIT_EXPECT_EXT=1 (the extension must be loaded, with CPU kernels)
and QUANTKIT_EXPECT_CUDA_KERNELS=1 (nvcc was found, so the build must also register CUDA kernels, even on this
CPU-only machine). Without those variables the corresponding tests skip.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from quantkit import _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("nearest_codeword", "soft_assign", "soft_assign_backward")
DISABLED = os.getenv("QUANTKIT_DISABLE_EXT", "0") not in ("", "0")


def _flag(name: str) -> bool:
    return os.getenv(name, "0") not in ("", "0")


@pytest.mark.skipif(not _flag("QUANTKIT_EXPECT_CUDA_KERNELS") or DISABLED,
                    reason="set QUANTKIT_EXPECT_CUDA_KERNELS=1 (make test does when nvcc exists)")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_are_registered_when_built_with_nvcc(op):
    assert _ext.LOAD_ERROR is None, _ext.LOAD_ERROR
    assert _ext.has_kernel(op, "CUDA"), f"quantkit::{op} has no CUDA kernel in {_ext.LIBRARY_PATH}"


@pytest.mark.skipif(not _flag("QUANTKIT_EXPECT_EXT") or DISABLED,
                    reason="set QUANTKIT_EXPECT_EXT=1 (make test does) and leave QUANTKIT_DISABLE_EXT unset")
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_are_registered_when_the_extension_is_built(op):
    assert _ext.LOAD_ERROR is None, _ext.LOAD_ERROR
    assert _ext.has_kernel(op, "CPU"), f"quantkit::{op} has no CPU kernel in {_ext.LIBRARY_PATH}"
    assert _ext.kernel_for(op, "cpu") == "fused CPU"


def test_setup_without_torch_fails_fast_with_what_to_run(tmp_path):
    # A torch.py that raises ImportError shadows the real torch for this one subprocess.
    (tmp_path / "torch.py").write_text("raise ImportError('torch hidden by test_build.py')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "torch is not installed" in message
    assert "pip install --no-build-isolation -e ." in message


def test_disable_ext_is_silent_and_runs_the_references():
    script = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import quantkit
            from quantkit import _ext, ops
            z, codebook = torch.randn(17, 5), torch.randn(9, 5)
            got = ops.nearest_codeword(z, codebook, k=3)
            want = ops.nearest_codeword_reference(z, codebook, 0, 3)
            soft = ops.soft_assign(z, codebook, 0.5)
            soft_want = ops.soft_assign_reference(z, codebook, torch.tensor(0.5), 0)[0]
        # The user asked for the references: no warning (it would be a second line on every CLI error), the
        # reason is still recorded for `quantkit info`.
        ours = [w for w in caught if "fused kernels unavailable" in str(w.message)]
        assert ours == [], [str(w.message) for w in ours]
        assert "QUANTKIT_DISABLE_EXT" in _ext.LOAD_ERROR
        assert _ext.LIBRARY_PATH is None
        for op in ("nearest_codeword", "soft_assign", "soft_assign_backward"):
            assert not _ext.has_kernel(op, "CPU") and not _ext.has_kernel(op, "CUDA"), op
            assert _ext.kernel_for(op, "cpu") == "reference", op
        assert torch.equal(got.indices, want[0]) and torch.allclose(got.distances, want[1])  # centred frame
        assert torch.allclose(soft, soft_want, rtol=1e-4, atol=1e-5)  # centred frame: equal up to rounding
        print("ok")
    """)
    env = {**os.environ, "QUANTKIT_DISABLE_EXT": "1", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


def test_an_unexpected_load_failure_warns_once_with_what_to_run(tmp_path):
    """Only a failure the user did not ask for warns: here the package folder holds no built _C."""
    script = textwrap.dedent(f"""
        import warnings
        from quantkit import _ext
        _ext._PACKAGE_DIR, _ext.LOAD_ERROR, _ext.LIBRARY_PATH = {str(tmp_path)!r}, None, None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _ext._load()
        ours = [w for w in caught if "fused kernels unavailable" in str(w.message)]
        assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning), [str(w.message) for w in caught]
        assert "pip install --no-build-isolation -e ." in str(ours[0].message)
        assert _ext.cpu_isa() == "reference"
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("QUANTKIT_DISABLE_EXT", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")

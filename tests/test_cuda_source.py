"""The cupy kernel's CUDA source compiles (with nvcc, where installed, and the backend's NVRTC
options) into PTX for every dtype, without fused multiply-adds and without flush-to-zero: the
torch backend rounds after each operation and keeps subnormals, while an FMA would round once and
a flushed subnormal would count as zero, either of which could move a spike count across a floor
boundary. (``tests/test_cuda_semantics.py`` compiles it with NVRTC too.)"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from sj_parallel_conversion.kernels.cupy_backend import _KERNEL_NAMES, NVRTC_OPTIONS, source

nvcc = shutil.which("nvcc")


@pytest.mark.skipif(nvcc is None, reason="nvcc is not installed here; the kernel source is compiled by cupy at run time")
def test_kernel_source_compiles_without_fma_or_flush_to_zero(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(source())
    ptx = tmp_path / "k.ptx"
    res = subprocess.run([nvcc, *NVRTC_OPTIONS, "-arch=sm_80", "-ptx", str(src), "-o", str(ptx)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    entries = set(re.findall(r"\.visible \.entry (\w+)\(", text))
    assert entries == set(_KERNEL_NAMES.values())
    assert not re.search(r"\bfma\.", text)
    assert not re.search(r"\.ftz\b", text)

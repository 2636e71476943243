"""`edm2.runtime`: the CUDA math flags as the official code trains, and the fast paths that go with a
precision (device and precision rules are tested in test_fastpaths, torch.distributed in test_distributed)."""

from __future__ import annotations

import pytest
import torch

from edm2.layers import FAST_PATHS, FastPaths
from edm2.runtime import fast_paths_for, resolve_device, set_cuda_math

FLAGS = {
    "matmul_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
    "cudnn_tf32": lambda: torch.backends.cudnn.allow_tf32,
    "fp16_reduction": lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
    "bf16_reduction": lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
}


@pytest.fixture()
def restore_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
             torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
     torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, torch.backends.cudnn.benchmark) = saved


def test_cuda_math_defaults_are_the_official_float32(restore_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    set_cuda_math(torch.device("cuda"))
    assert {name: get() for name, get in FLAGS.items()} == dict.fromkeys(FLAGS, False)
    set_cuda_math(torch.device("cuda"), allow_tf32=True)
    assert FLAGS["matmul_tf32"]() and FLAGS["cudnn_tf32"]() and not FLAGS["fp16_reduction"]()


def test_cuda_math_leaves_cpu_runs_alone(restore_flags):
    torch.backends.cuda.matmul.allow_tf32 = True
    set_cuda_math(torch.device("cpu"))
    assert FLAGS["matmul_tf32"]()


@pytest.mark.parametrize("precision, compile, fast", [("fp32", False, False), ("bf16", False, True),
                                                      ("fp32", True, True), ("fp16", False, True)])
def test_fast_paths_come_with_low_precision_or_compile(precision, compile, fast):
    with fast_paths_for(precision, compile):
        assert FAST_PATHS == FastPaths(weight_cache=True, sdpa=fast, strided_norm=fast)
    assert FAST_PATHS == FastPaths()


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")

"""The one-kernel attention of a step (varlen_attention.py, Triton): against float64 attention, and a whole
mixed step through it against the split attention. On a CPU they run under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py; Triton is a dev requirement), in float32 (the interpreter multiplies bf16
matrices wrongly: numpy has no bf16); the GPU check runs them on CUDA, bf16 too."""

from __future__ import annotations

import os

import pytest
import torch

TEST_DEVICE = os.environ.get("FALCON_TEST_DEVICE", "cpu")

from falcon_service.engine.falcon import FalconRunner, Segment, StepBatch  # noqa: E402
from falcon_service.engine.varlen_attention import varlen_attention  # noqa: E402


def reference(q, keys, values, rows, positions, scale):
    out = []
    for t in range(q.shape[0]):
        k = keys[rows[t], : positions[t] + 1].double()
        v = values[rows[t], : positions[t] + 1].double()
        out.append((q[t].double() @ k.T * scale).softmax(-1) @ v)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if TEST_DEVICE.startswith("cuda") else []))
def test_every_token_attends_over_its_row_up_to_its_position(dtype):
    generator = torch.Generator().manual_seed(0)
    rows_n, length, dim, heads = 5, 300, 64, 71
    keys = torch.randn(rows_n, length, dim, generator=generator).to(TEST_DEVICE, dtype)
    values = torch.randn(rows_n, length, dim, generator=generator).to(TEST_DEVICE, dtype)
    # decode rows at positions across key blocks, a prompt segment of one row, and a prompt that starts a row
    rows = torch.tensor([0, 1, 2, 3, 3, 3, 3, 3, 4, 4, 4], device=TEST_DEVICE)
    positions = torch.tensor([10, 63, 299, 100, 101, 102, 103, 104, 0, 1, 2], device=TEST_DEVICE)
    q = torch.randn(len(rows), heads, dim, generator=generator).to(TEST_DEVICE, dtype)
    got = varlen_attention(q, keys, values, rows, positions, 0.125)
    want = reference(q.cpu(), keys.cpu(), values.cpu(), rows.cpu(), positions.cpu(), 0.125)
    error = float((got.cpu().double() - want).norm() / want.norm())
    assert got.dtype == dtype and got.shape == q.shape
    # float32: exact up to summation order; bf16: the error of rounding the output (softmax kept in float32)
    assert error < (1e-5 if dtype == torch.float32 else 8e-3), error


def test_a_mixed_step_through_the_kernel_gives_the_split_attentions_logits(tiny_model):
    def step_logits(attention: str) -> torch.Tensor:
        runner = FalconRunner(tiny_model, batch_rows=6, max_len=256, attention=attention)
        runner.prefill([0, 1], [[5, 6, 7, 8, 9], [11, 12, 13]], [0, 0])
        runner.lengths[:2] = torch.tensor([5, 3])
        runner.write_rows[:2] = torch.tensor([0, 1])
        runner.tokens[:2] = torch.tensor([21, 22])
        runner.prefill([3], [[30, 31, 32, 33]], [0])  # a row that continues after what it holds
        segments = [Segment(2, 0, list(range(40, 60))), Segment(3, 4, [34, 35, 36])]
        return runner.forward(StepBatch(runner, 2, 6, None, segments))

    torch.testing.assert_close(step_logits("varlen"), step_logits("split"), atol=1e-4, rtol=0)

"""A fused model's training forward does each piece of work once: the readers of a block (transitions, the final
norm) take the statistics the block computed instead of reducing its buffer again, and a fused module checks its
input's dtype without casting the input.

Both regressions were silent (the results were right, the step slower): every NamedTuple has a tuple's
``count()`` method, which made ``getattr(stats, "count", None)`` take every block for a synchronised one, so each
transition reduced its input again (on a float32 copy under bfloat16 autocast); and the readers' device checks
cast a block's whole buffer to float32 to learn the dtype they compute in.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import densenet_fast as dnf

MODELS = {
    "densenet121": lambda: dnf.densenet121(),
    "densenet_bc": lambda: dnf.densenet_bc(depth=40, growth_rate=12),
}


def _profiled_forward(model: torch.nn.Module, x: torch.Tensor, bf16: bool):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)
    return prof.events()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype,bf16", [(torch.float32, False), (torch.float64, False), (torch.float32, True)],
                         ids=["fp32", "fp64", "bf16-autocast"])
@pytest.mark.parametrize("hw", [37, 64])
def test_readers_take_the_block_statistics(name, dtype, bf16, hw):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).train()
    x = torch.randn(2, 3, hw, hw, dtype=dtype)
    events = _profiled_forward(model, x, bf16)
    assert sum(e.name == "densenet_fast::dense_block_forward" for e in events) >= 3  # the fused path ran
    moments = [tuple(e.input_shapes[0]) for e in events if e.name == "densenet_fast::channel_moments"]
    # The stem's BN (conv0's output, no fused producer) is the one reader that reduces its own input.
    stem_channels = model.features.conv0.out_channels
    assert all(s[1] == stem_channels for s in moments), f"readers recomputed block statistics: {moments}"
    assert len(moments) <= 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_autocast_casts_no_block_buffer(name):
    """Under CPU bfloat16 autocast the blocks' buffers stay bfloat16: nothing in the forward casts a tensor of a
    block's width (the image and conv0's output are the only casts)."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x = torch.randn(2, 3, 40, 40)
    events = _profiled_forward(model, x, True)
    casts = [tuple(e.input_shapes[0]) for e in events
             if e.name == "aten::_to_copy" and e.input_shapes and len(e.input_shapes[0]) == 4
             and e.input_shapes[0][0] == 2]
    conv0 = model.features.conv0.out_channels
    assert all(s[1] in (3, conv0) for s in casts), f"casts of block-sized tensors: {casts}"


@pytest.mark.parametrize("shape", [(2, 64, 9, 7), (3, 5, 1, 2), (1, 130, 4, 4)])
def test_channel_moments_reads_bfloat16(shape):
    """The stem's statistics under CPU bfloat16 autocast: conv0's bfloat16 output reduced as it is (no float32
    copy), float32 moments equal to those of the widened input, and to the float64 truth."""
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    mean, var = dnf.ops.channel_moments(x)
    assert mean.dtype == var.dtype == torch.float32
    want_mean, want_var = dnf.ops.channel_moments(x.float())
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, want_var, rtol=1e-6, atol=1e-6)
    v64, m64 = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stem_reduces_conv0_output_in_place():
    """The stem's statistics under bfloat16 autocast: at most one cast of conv0's width in the forward (conv0's own
    output rounding where it computes in float32), none for the statistics."""
    torch.manual_seed(0)
    model = dnf.densenet121().train()
    events = _profiled_forward(model, torch.randn(2, 3, 40, 40), True)
    casts = [tuple(e.input_shapes[0]) for e in events
             if e.name == "aten::_to_copy" and e.input_shapes and len(e.input_shapes[0]) == 4
             and e.input_shapes[0][1] == model.features.conv0.out_channels]
    assert len(casts) <= 1, casts


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_training_step_copies(name, monkeypatch):
    """A float32 training step of the features (forward and backward; the classifier is torch's nn.Linear) makes at
    most 10 ``aten::copy_`` calls with our 3x3 kernel (issue 32; 665 before it, most of them oneDNN's weight
    layouts and output copies per layer and a Python float copied per running-statistics update): each block's
    input copied into its buffer, and conv0's weight laid out for oneDNN."""
    if dnf.build_info()["cpu_engine"]["kernels_isa"] != "avx512":
        pytest.skip("our 3x3 kernel is the AVX-512 build's")
    monkeypatch.setenv("DNF_CPU_CONV3X3", "own")
    torch.manual_seed(0)
    features = MODELS[name]().train().features
    x = torch.randn(2, 3, 48, 48)
    features(x).sum().backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        features(x).sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("densenet_fast::dense_block_forward") >= 3  # the fused path ran
    assert names.count("aten::copy_") <= 10, names.count("aten::copy_")

"""UNet2D: shapes, the size check, timestep conditioning, the FLOPs estimate."""
import pytest
import torch

from model import UNet2D, count_parameters, estimate_flops


def small_unet(**kw):
    return UNet2D(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(4,), **kw)


@pytest.mark.parametrize("h,w", [(16, 16), (32, 32), (24, 40)])
def test_output_shapes(h, w):
    model = small_unet()
    out = model(torch.randn(2, 2, h, w), torch.tensor([0, 999]))
    assert out.shape == (2, 1, h, w)


def test_rgb_conditioning_channels():
    model = small_unet(in_channels=4, out_channels=1)
    assert model(torch.randn(1, 4, 16, 16), torch.tensor([3])).shape == (1, 1, 16, 16)


def test_bad_size_raises_clear_error():
    model = small_unet()
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 2, 30, 32), torch.tensor([0]))


def test_timestep_changes_output():
    torch.manual_seed(0)
    model = small_unet()
    for p in model.parameters():  # zero-initialised output layers would hide t
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 2, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_flops_estimate_scales_with_area():
    model = small_unet()
    f16, f32 = estimate_flops(model, 16), estimate_flops(model, 32)
    assert f16 > 0
    # convolutions dominate and scale with pixels; attention at the lowest level scales faster
    assert 3.9 < f32 / f16 < 4.5
    # the stem conv alone: 2 * (2*9) MACs per output pixel per channel
    assert f16 > 2 * 2 * 9 * 8 * 16 * 16
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())

"""The backbones: UNet2D's shapes, size check, timestep conditioning and FLOPs estimate;
every entry of model.MODELS against the contract `--model NAME` relies on."""
import pytest
import torch

from model import MODELS, EncoderUNet, UNet2D, build_model, count_parameters, estimate_flops


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


class OneConv(torch.nn.Module):
    in_channels = 2

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 8, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def test_flops_estimate_of_one_conv_is_exact():
    # 2 FLOPs per multiply-add: 2 * (2 in x 9 taps) per output value, 8 x 16 x 16 of them
    assert estimate_flops(OneConv(), 16) == 2 * 2 * 9 * 8 * 16 * 16
    assert estimate_flops(OneConv(), (16, 32)) == 2 * estimate_flops(OneConv(), 16)
    assert estimate_flops(OneConv(), 16, batch_size=3) == 3 * estimate_flops(OneConv(), 16)


def test_flops_estimate_scales_with_area():
    model = small_unet()
    f16, f32 = estimate_flops(model, 16), estimate_flops(model, 32)
    # convolutions dominate and scale with pixels; attention at the lowest level scales faster
    assert 3.9 < f32 / f16 < 4.5
    # the stem conv alone: 2 * (2*9) MACs per output pixel per channel
    assert f16 > 2 * 2 * 9 * 8 * 16 * 16


def test_count_parameters_on_known_layers():
    conv = torch.nn.Conv2d(2, 3, 3)                       # 2*3*9 weights + 3 biases
    assert count_parameters(conv) == 57
    assert count_parameters(torch.nn.Sequential(conv, torch.nn.Linear(4, 5))) == 57 + 25
    assert count_parameters(UNet2D()) == 2_751_185        # the default, as the README states


def perturbed(model):
    """The zero-initialised output and conditioning layers would hide the input and t."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_backbone_keeps_the_contract(name):
    """Builds from in_channels and out_channels alone, runs on 64 x 64, takes integer
    timesteps in 0..T-1, and its output depends on both the input and t."""
    model = perturbed(MODELS[name](in_channels=4, out_channels=1)).eval()
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == (2, 1, 64, 64) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, torch.tensor([500, 500])), atol=1e-6)
        assert not torch.allclose(out, model(x.flip(-1), t), atol=1e-6)


@pytest.mark.parametrize("encoder", EncoderUNet.ENCODERS)
def test_encoder_unet_first_layer_takes_the_input_channels(encoder):
    model = EncoderUNet(in_channels=5, out_channels=3, encoder=encoder)
    first = model.stages[0][0] if encoder == "resnet18" else model.stages[0][0][0]
    assert first.in_channels == 5
    assert model(torch.randn(1, 5, 32, 32), torch.tensor([7])).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 5, 48, 40), torch.tensor([7]))
    if encoder == "resnet18":   # GroupNorm, not BatchNorm: no batch statistics to sync
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_backbone_names_the_registry():
    with pytest.raises(ValueError, match="unet2d") as info:
        build_model("swin_unet", in_channels=2, out_channels=1)
    assert "MODELS['swin_unet'] = MyNet" in str(info.value)

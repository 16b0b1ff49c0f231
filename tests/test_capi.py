"""CAPIViT against a float64 transcription of the official CAPI encoder (facebookresearch/capi
``model.py``: ``EncoderDecoder.prepare_tokens_and_drop``, ``Transformer``, ``Attention``, ``Rope``),
written here as plain tensor maths on a state dict in the released file's key layout."""
import math

import pytest
import torch
import torch.nn.functional as F

from selagg_fast.capi import CAPIViT, capi_state_dict, capi_vit_large_patch14

D, DEPTH, HEADS, REGS, PATCH, IMG = 32, 2, 2, 16, 14, 56
EPS = 1e-5


def official_state(depth=DEPTH, dim=D, heads=HEADS, regs=REGS, dtype=torch.float64):
    """A random state dict laid out as a released CAPI file: ``backbone.``-prefixed encoder and decoder
    keys, ``mask_token``, and a stand-in for a non-backbone training key. Norm weights and RoPE frequencies are
    random (not the init values) so that a misplaced axis or weight shows up."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    sd = {"backbone.registers": rnd(1, regs, dim),
          "backbone.patch_embed.weight": rnd(dim, 3, PATCH, PATCH, scale=0.05),
          "backbone.patch_embed.bias": rnd(dim, scale=0.1),
          "backbone.mask_token": rnd(1, dim),
          "backbone.decoder.blocks.0.residual1.fn.q_proj.weight": rnd(dim, dim),
          "head.last_layer.weight": rnd(8, dim)}
    for i in range(depth):
        p = f"backbone.encoder.blocks.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "proj"):
            sd[p + f"residual1.fn.{name}.weight"] = rnd(dim, dim, scale=dim ** -0.5)
        sd[p + "residual1.fn.rope.freqs"] = rnd(2, dim // heads, scale=4.0)
        sd[p + "residual1.norm.weight"] = 1 + rnd(dim, scale=0.2)
        sd[p + "residual2.norm.weight"] = 1 + rnd(dim, scale=0.2)
        sd[p + "residual2.fn.fc1.weight"] = rnd(4 * dim, dim, scale=dim ** -0.5)
        sd[p + "residual2.fn.fc2.weight"] = rnd(dim, 4 * dim, scale=(4 * dim) ** -0.5)
    return sd


def rms_norm(x, weight=None):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return x if weight is None else x * weight


def rope(x, coords, freqs):
    angle = coords @ freqs
    x1, x2 = x.chunk(2, dim=-1)
    return x * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()


def official_forward(sd, images, heads=HEADS, regs=REGS):
    """The official encoder forward (eval, all patches visible) -> (tokens after enc_norm,
    roped q of each block, input of each block's attention)."""
    x = F.conv2d(images, sd["backbone.patch_embed.weight"], sd["backbone.patch_embed.bias"], stride=PATCH)
    B, dim, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    coords = torch.cartesian_prod(torch.linspace(0, 1, h, dtype=x.dtype), torch.linspace(0, 1, w, dtype=x.dtype))
    side = regs // 4
    c = torch.arange(side, dtype=x.dtype) / side
    reg = torch.zeros(regs, 2, dtype=x.dtype)
    reg[:side, 0], reg[:side, 1] = c, 0
    reg[side:2 * side, 0], reg[side:2 * side, 1] = 1, c
    reg[2 * side:3 * side, 0], reg[2 * side:3 * side, 1] = 1 - c, 1
    reg[3 * side:, 0], reg[3 * side:, 1] = 0, 1 - c
    lo, hi = coords.min(0).values, coords.max(0).values
    reg = lo + reg * (hi - lo)
    x = torch.cat([sd["backbone.registers"].expand(B, -1, -1), x], dim=1)
    coords = torch.cat([reg, coords])
    T, d = x.shape[1], dim // heads
    qs, attn_inputs = [], []
    for i in range(sum(k.endswith("rope.freqs") and ".encoder." in k for k in sd)):
        p = f"backbone.encoder.blocks.{i}."
        y = rms_norm(x, sd[p + "residual1.norm.weight"])
        attn_inputs.append(y)

        def split(name):
            return (y @ sd[p + f"residual1.fn.{name}.weight"].T).reshape(B, T, heads, d).transpose(1, 2)

        freqs = sd[p + "residual1.fn.rope.freqs"]
        q, k, v = rope(split("q_proj"), coords, freqs), rope(split("k_proj"), coords, freqs), split("v_proj")
        qs.append(q)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, dim) @ sd[p + "residual1.fn.proj.weight"].T
        y = rms_norm(x, sd[p + "residual2.norm.weight"])
        y = y @ sd[p + "residual2.fn.fc1.weight"].T
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        x = x + y @ sd[p + "residual2.fn.fc2.weight"].T
    return rms_norm(x), qs, attn_inputs


def loaded_model(sd=None, device="cpu"):
    sd = official_state() if sd is None else sd
    model = CAPIViT(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                    num_registers=REGS).double().eval().to(device)
    model.load_state_dict(capi_state_dict(sd), strict=True)
    return model


def test_tokens_match_official_forward_float64(device):
    sd = official_state()
    model = loaded_model(sd, device)
    # the model's own size, then other grids (recomputed RoPE coordinates), then back again
    for hw in [(IMG, IMG), (IMG, 42), (14, IMG), (70, 28), (IMG, IMG)]:
        images = torch.randn(2, 3, *hw, dtype=torch.float64)
        expected, _, _ = official_forward(sd, images)
        with torch.no_grad():
            tokens = model.forward_features(images.to(device)).cpu()
        assert tokens.shape == expected.shape == (2, REGS + (hw[0] // PATCH) * (hw[1] // PATCH), D)
        torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-10, msg=f"images {hw}")


def test_official_keys_load_strict_after_prefix_removal():
    sd = official_state()
    # the plain recipe: drop non-backbone keys, strip `backbone.` and `encoder.`, drop the decoder
    manual = {k.removeprefix("backbone.").removeprefix("encoder."): v for k, v in sd.items()
              if k.startswith("backbone.") and not k.startswith(("backbone.decoder.", "backbone.mask_token"))}
    model = CAPIViT(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                    num_registers=REGS).double()
    assert set(model.state_dict()) == set(manual)
    model.load_state_dict(manual, strict=True)
    assert set(capi_state_dict(sd)) == set(manual)
    # without the `backbone.` prefix (an EncoderDecoder's own state dict) the helper gives the same keys
    bare = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    assert set(capi_state_dict(bare)) == set(manual)
    # the final norm has no weight and is not registered twice under `norm`
    assert model.norm is model.enc_norm and model.enc_norm.weight is None
    assert "norm" not in dict(model.named_modules())


def test_released_size_layout():
    with torch.device("meta"):
        model = capi_vit_large_patch14()
    assert (model.embed_dim, len(model.blocks), model.num_heads, model.num_prefix_tokens) == (1024, 24, 16, 16)
    assert model.patch_embed.grid_size == (16, 16) and model.patch_embed.patch_size == (14, 14)
    assert model.blocks[0].attn.rope.freqs.shape == (2, 64)
    assert model.cls_token is None
    assert sum(p.numel() for p in model.parameters()) == 302_661_632  # the README's "302M"


def test_rope_init_is_the_official_one():
    freqs = CAPIViT(img_size=IMG, patch_size=PATCH, embed_dim=128, depth=1, num_heads=2).blocks[0].attn.rope.freqs
    base = 7 * (7 / 7e-4) ** torch.linspace(0, -1, 16)  # max_freq 7, min_freq 7e-4, head_dim / 4 values
    expected = torch.zeros(2, 64)
    expected[0, :32] = torch.cat([base, base])  # row coordinate drives the first half of the channels
    expected[1, 32:] = torch.cat([base, base])
    torch.testing.assert_close(freqs.detach(), expected * 2 * math.pi)


def test_heads_and_merge_heads_reproduce_attention():
    sd = official_state()
    model = loaded_model(sd)
    images = torch.randn(2, 3, IMG, 42, dtype=torch.float64)
    _, ref_q, ref_inputs = official_forward(sd, images)
    seen = {}
    for i, block in enumerate(model.blocks):
        assert block.attn is block.residual1.fn
        block.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("in", i), args[0]))
        block.attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("out", i), out))
    with torch.no_grad():
        model(images)
        for i, block in enumerate(model.blocks):
            x = seen[("in", i)]
            torch.testing.assert_close(x, ref_inputs[i], rtol=0, atol=1e-10)
            q, k, v, bias, scale = block.attn.heads(x)
            assert bias is None and scale == (D // HEADS) ** -0.5
            assert q.shape == k.shape == v.shape == (2, HEADS, REGS + 4 * 3, D // HEADS)
            torch.testing.assert_close(q, ref_q[i], rtol=0, atol=1e-10)
            out = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
            torch.testing.assert_close(block.attn.merge_heads(out), seen[("out", i)], rtol=0, atol=1e-10)
        # blocks run alone (no other argument) on the grid the model last prepared
        x = model.prepare_tokens(images)
        for block in model.blocks:
            x = block(x)
        torch.testing.assert_close(model.norm(x), official_forward(sd, images)[0], rtol=0, atol=1e-10)


def test_registers_lead_then_patches_row_major():
    sd = official_state()
    model = loaded_model(sd)
    images = torch.randn(1, 3, IMG, 42, dtype=torch.float64)
    with torch.no_grad():
        tokens = model.prepare_tokens(images)
    assert model.num_prefix_tokens == REGS and model.token_grid == (4, 3)
    torch.testing.assert_close(tokens[0, :REGS], sd["backbone.registers"][0], rtol=0, atol=0)
    conv = F.conv2d(images, sd["backbone.patch_embed.weight"], sd["backbone.patch_embed.bias"], stride=PATCH)
    for r, c in [(0, 0), (0, 2), (1, 0), (3, 2)]:
        torch.testing.assert_close(tokens[0, REGS + r * 3 + c], conv[0, :, r, c], rtol=0, atol=1e-12)


def test_bf16_model_stays_close(device):
    sd = official_state()
    images = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    expected, _, _ = official_forward(sd, images)
    model = loaded_model(sd, device).to(torch.bfloat16)
    with torch.no_grad():
        tokens = model(images.to(device, torch.bfloat16)).double().cpu()
    assert (tokens - expected).norm() / expected.norm() < 0.02


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_registers=6), "num_registers"),
    (dict(num_heads=3), "head dimension"),
    (dict(embed_dim=24, num_heads=4), "multiple of 4"),
    (dict(img_size=10), "smaller than one patch"),
    (dict(depth=0), "depth"),
], ids=["registers-not-x4", "heads-not-dividing", "head-dim-6", "image-below-patch", "depth-0"])
def test_bad_settings_raise(kwargs, match):
    settings = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_registers=REGS)
    with pytest.raises(ValueError, match=match):
        CAPIViT(**{**settings, **kwargs})


def test_bad_inputs_raise():
    model = loaded_model()
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(1, 1, IMG, IMG, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 3, 10, IMG, dtype=torch.float64))
    with pytest.raises(ValueError, match="tokens"):
        model.blocks[0].attn.heads(torch.randn(1, REGS + 5, D, dtype=torch.float64))

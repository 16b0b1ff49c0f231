"""attention_selection against the attention maps of an unfused eager float64 forward."""
import copy

import pytest
import timm
import torch

from conftest import DEVICE, expected_selection_weights
from selagg_fast import attention_selection
from selagg_fast.backbone import Backbone
from selagg_fast.selection import capture_attention_rows, center_query

SMALL = dict(img_size=32, patch_size=8, depth=3, embed_dim=48, num_heads=3)  # a vit_small-shaped tiny model
MODELS = {
    "cls": dict(),
    "registers": dict(reg_tokens=4),  # [cls] + 4 registers: P = 5
    "qk-norm": dict(qk_norm=True),
    "no-cls": dict(class_token=False, global_pool="avg", reg_tokens=2),
}


def small_vit(kind):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **SMALL, **MODELS[kind])
    return model.to(DEVICE).eval()


def float64_maps(model, images, block):
    """Block ``block``'s full attention maps [B, H, T, T] from an unfused float64 copy of the model."""
    ref = copy.deepcopy(model).double()
    maps = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    hook = ref.blocks[block].attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        ref.forward_features(images.double())
    hook.remove()
    return maps[0]



@pytest.mark.parametrize("block", [-1, 1])
@pytest.mark.parametrize("kind", list(MODELS))
def test_selection_matches_float64_unfused_maps(kind, block):
    model = small_vit(kind)
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    P, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        before = model.forward_features(images)
    A = float64_maps(model, images, block)
    methods = ["center_mean"] + (["cls_mean", "cls_min_entropy"] if kind != "no-cls" else [])
    for method in methods:
        got = attention_selection(model, images, method, block=block)
        assert got.dtype == torch.float32 and got.shape == (3, grid[0] * grid[1])
        exp = expected_selection_weights(A, method, P, grid)
        torch.testing.assert_close(got.double().cpu(), exp.cpu(), rtol=1e-4, atol=1e-6, msg=method)
        torch.testing.assert_close(got.sum(-1).double().cpu(), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    # the model is unchanged: no hook left, same outputs (fused attention everywhere)
    assert not any(b.attn._forward_pre_hooks or "forward" in b.attn.__dict__ for b in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), before, rtol=0, atol=0)
    if kind == "no-cls":
        for method in ("cls_mean", "cls_min_entropy"):
            with pytest.raises(ValueError, match=r"needs a \[cls\] token"):
                attention_selection(model, images, method)


def test_unnormalised_cls_row_and_center_index():
    model = small_vit("registers")
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    A = float64_maps(model, images, -1)
    raw = attention_selection(model, images, "cls_mean", renormalize=False)
    torch.testing.assert_close(raw.double().cpu(), A[:, :, 0, 5:].mean(1).cpu(), rtol=1e-4, atol=1e-7)
    assert (raw.sum(-1) < 1).all()  # the prefix keys take their share
    assert center_query((4, 4), 5) == 5 + 1 * 4 + 1 and center_query((14, 14), 1) == 1 + 6 * 14 + 6
    assert center_query((3, 5), 0) == 0 * 5 + 1  # each side its own centre: row 0, column 1


def test_later_blocks_do_not_run_and_hooks_go_on_errors():
    model = small_vit("cls")
    calls = []
    model.blocks[1].attn.register_forward_hook(lambda m, i, o: calls.append("attn1"))
    model.blocks[2].register_forward_hook(lambda m, i, o: calls.append("block2"))
    model.blocks[0].register_forward_hook(lambda m, i, o: calls.append("block0"))
    attention_selection(model, torch.randn(1, 3, 32, 32, device=DEVICE), "cls_mean", block=1)
    assert calls == ["block0"]  # block 1's own attention and block 2 never ran
    with pytest.raises(Exception):
        attention_selection(model, torch.randn(1, 5, 32, 32, device=DEVICE), "cls_mean")  # 5 channels
    assert not model.blocks[-1].attn._forward_pre_hooks
    with pytest.raises(ValueError, match="unknown selection method"):
        attention_selection(model, torch.randn(1, 3, 32, 32, device=DEVICE), "cls_max")
    with pytest.raises(ValueError, match="out of range"):
        attention_selection(model, torch.randn(1, 3, 32, 32, device=DEVICE), "cls_mean", block=3)


def test_rows_captured_beside_a_full_backbone_forward():
    # compare's path: the probe's tokens and the rows for several queries from one forward
    model = small_vit("qk-norm")
    backbone = Backbone(model, "small")
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        plain = backbone(images)
        capture = capture_attention_rows(backbone, [0, 7], block=-1)
        with capture:
            tokens = backbone(images)
    torch.testing.assert_close(tokens, plain, rtol=0, atol=0)
    A = float64_maps(model, images, -1)
    assert capture.rows.shape == (2, 3, 2, 17)
    torch.testing.assert_close(capture.rows.double().cpu(), A[:, :, [0, 7]].cpu(), rtol=1e-4, atol=1e-7)
    assert not model.blocks[-1].attn._forward_pre_hooks


def test_attention_of_an_unsupported_kind_is_refused():
    # BEiT is supported (tests/test_adapters.py); a layer no adapter knows is a TypeError naming it
    model = small_vit("cls")
    model.blocks[-1].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="unsupported attention layer torch.nn.modules.linear.Identity"):
        attention_selection(model, torch.randn(1, 3, 32, 32, device=DEVICE), "cls_mean")

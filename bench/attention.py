"""`selagg-fast bench attention`: attention with statistics vs SDPA, eager and torch.compile;
and whole-ViT analysis throughput."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selagg_fast import attention_with_stats, record_attention_stats
from selagg_fast.reference import AttentionStats, attention_stats_columns, attention_with_stats_reference

from .common import bench_ms, environment, peak_extra_mib, print_banner, print_table, write_csv

SHAPES = [("ViT-B", 256, 12, 197, 64), ("ViT-L", 256, 16, 197, 64), ("ViT-H/14", 128, 16, 257, 80)]


def _eager(q, k, v):
    with torch.autocast(q.device.type, dtype=torch.bfloat16, enabled=q.is_cuda):
        out, stats = attention_with_stats_reference(q, k, v, num_prefix_tokens=1, compute_dtype=q.dtype)
    return out, stats


def _flex_peer(flex):
    """The strongest do-it-yourself peer (anchors.md note 2): SDPA for the output, then one
    FlexAttention call with V = K and the [cls] key masked, whose LSE is the patch-renormalised
    log-sum-exp and whose output is sum_j p_j k_j, so entropy = LSE_p - scale * q . (sum p k).
    The [cls] logit then gives the full LSE, the prefix mass and the diagonal. P = 1 only."""
    from torch.nn.attention.flex_attention import create_block_mask

    masks = {}

    def run(q, k, v):
        B, H, T, d = q.shape
        if T not in masks:
            masks[T] = create_block_mask(lambda b, h, qi, ki: ki >= 1, None, None, T, T, device=q.device)
        scale = d ** -0.5
        out = F.scaled_dot_product_attention(q, k, v)
        pk, lse_p = flex(q, k, k, block_mask=masks[T], return_lse=True)
        qf, kf = q.float(), k.float()
        entropy = lse_p - scale * (qf * pk.float()).sum(-1)
        s_cls = scale * (qf * kf[..., :1, :]).sum(-1)
        lse = torch.logaddexp(lse_p, s_cls)
        prefix = torch.exp(s_cls - lse)
        return out, AttentionStats(self_attn=torch.exp(scale * (qf * kf).sum(-1) - lse), prefix_attn=prefix,
                                   patch_entropy=entropy, cls_attn=prefix)
    return run


def op_rows(env, quick: bool, with_compile: bool) -> list:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = (SHAPES[:1] if quick else SHAPES) if cuda else [("tiny", 4, 3, 197, 64)]
    rows = []
    for name, B, H, T, d in shapes:
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype) for _ in range(3))
        providers = {"sdpa (no stats)": lambda: F.scaled_dot_product_attention(q, k, v), "eager": lambda: _eager(q, k, v)}
        if cuda and with_compile:  # each compile takes a while: --no-compile (or --quick) to skip / shorten
            compiled = torch.compile(_eager)
            providers["compile"] = lambda: compiled(q, k, v)
        if cuda and with_compile:
            try:
                from torch.nn.attention.flex_attention import flex_attention
                peer = _flex_peer(torch.compile(flex_attention))
                _, got = peer(q, k, v)
                _, ref = attention_with_stats(q, k, v, num_prefix_tokens=1)
                err = max((a - b).abs().max().item() for a, b in zip(got, ref))
                print(f"{name}: FlexAttention peer max |stat - fused stat| = {err:.2e}")
                providers["flex peer (compiled)"] = lambda: peer(q, k, v)
            except Exception as e:
                print(f"error: {name} flex peer: {type(e).__name__}: {str(e)[:300]}")
        if cuda:
            providers["fused"] = lambda: attention_with_stats(q, k, v, num_prefix_tokens=1)
            # BEiT's relative position bias: one [H, T, T] float32 bias shared by the batch, same q, k, v
            bias = torch.randn(H, T, T, device=device)
            providers["fused + logit bias"] = lambda: attention_with_stats(q, k, v, num_prefix_tokens=1, bias=bias)
            mask = bias.to(dtype)[None]
            providers["sdpa (no stats) + logit bias"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # inside a timm block q, k, v are strided views of one [B, T, 3, H, d] qkv output: both ops on those
        qs, ks, vs = torch.randn(B, T, 3, H, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
        providers["sdpa (no stats), timm's strided q/k/v"] = lambda: F.scaled_dot_product_attention(qs, ks, vs)
        if cuda:
            providers["fused, timm's strided q/k/v"] = lambda: attention_with_stats(qs, ks, vs, num_prefix_tokens=1)
        times = {}
        for prov, fn in providers.items():
            try:
                med, lo, hi = bench_ms(fn)
            except Exception as e:  # one broken provider must not hide the others
                print(f"error: {name} {prov}: {type(e).__name__}: {str(e)[:300]}")
                continue
            times[prov] = med
            rows.append(dict(shape=name, B=B, H=H, T=T, d=d, provider=prov, ms=med, ms_p20=lo, ms_p80=hi,
                             peak_MiB=peak_extra_mib(fn), **env))
        for r in [r for r in rows if r["shape"] == name]:
            r["pct_of_sdpa"] = 100 * r["ms"] / times["sdpa (no stats)"] if "sdpa (no stats)" in times else None
        if "fused" in times and "fused + logit bias" in times:  # the target: <= 1.15 at ViT-B
            print(f"{name}: fused with / without logit bias = {times['fused + logit bias'] / times['fused']:.3f}")
        # each shape's table as soon as it is measured (a run cut short keeps what it has)
        print_table([r for r in rows if r["shape"] == name], ["shape", "provider", "ms", "pct_of_sdpa", "peak_MiB"],
                    f"One attention block, bf16, {name} (B={B}, H={H}, T={T}, d={d})")
    return rows


def _reference_analysis(model):
    """The paper code's analysis: unfused attention, maps from a hook, statistics per block."""
    P = model.num_prefix_tokens
    sums = {}

    def hook(_m, _i, attn):
        A = attn.float()
        diag = torch.diagonal(A, dim1=-2, dim2=-1)
        prefix = A[..., :P].sum(-1)
        Ahat = A[..., P:] / (A[..., P:].sum(-1, keepdim=True) + 1e-6)
        ent = -(Ahat * torch.log(Ahat + 1e-6)).sum(-1)
        for c, val in attention_stats_columns(AttentionStats(diag, prefix, ent, A[..., 0]), P).items():
            sums[c] = sums.get(c, 0) + val.sum(0)

    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(hook))
    return handles


def model_rows(env, batch: int = 256) -> list:
    import timm

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = "vit_base_patch16_224" if cuda else "vit_tiny_patch16_224"
    batch = batch if cuda else 8
    model = timm.create_model(name, pretrained=False, num_classes=0).to(device).eval()
    images = torch.randn(batch, 3, 224, 224, device=device)

    def forward():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            return model.forward_features(images)

    rows = []

    def measure(label, fn):
        med, _, _ = bench_ms(fn, warmup_ms=50, rep_ms=300)
        rows.append(dict(model=name, batch=batch, pipeline=label, ms=med, img_per_s=batch / med * 1000,
                         peak_MiB=peak_extra_mib(fn), **env))

    measure("plain (fused SDPA, no stats)", forward)
    try:
        with record_attention_stats(model, magnitudes=True):
            measure("record_attention_stats (all blocks)", forward)
        with record_attention_stats(model, magnitudes=False):
            measure("record_attention_stats (no magnitudes)", forward)
        # attribution: the streaming kernel in every block with the recorder's per-block reductions
        # skipped (statistics discarded): plain -> this row is the kernel, this -> the row above the recorder
        with record_attention_stats(model, magnitudes=False) as recorder:
            recorder.record = lambda block, stats: None
            measure("streaming kernel only (statistics discarded)", forward)
    except Exception as e:
        print(f"error: record_attention_stats: {type(e).__name__}: {str(e)[:300]}")
    handles = _reference_analysis(model)
    measure("reference analysis (unfused + hooks)", forward)
    for h in handles:
        h.remove()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    base = rows[0]["img_per_s"]
    for r in rows:
        r["pct_of_plain"] = 100 * r["img_per_s"] / base
    return rows


def run(quick: bool = False, with_compile: bool = True, csv_path: str = "bench/out/attention.csv") -> list:
    env = environment()
    print_banner("Attention-statistics benchmark", env)
    if not torch.cuda.is_available():
        print("No CUDA device: GPU figures need CUDA; timing the PyTorch paths only, at a small shape.")
    rows = op_rows(env, quick, with_compile)
    write_csv(csv_path, rows)
    mrows = model_rows(env)
    print_table(mrows, ["model", "batch", "pipeline", "img_per_s", "pct_of_plain", "peak_MiB"],
                "Whole-model analysis throughput, forward_features, bf16 autocast")
    write_csv(csv_path, rows + mrows)
    return rows + mrows

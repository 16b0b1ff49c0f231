"""Hopper compile cases for the attention-statistics kernel (used by compile_report)."""


def attention_cases():
    from ..kernels.attention import attention_stats_fwd_kernel
    from ..ops.attention import _launch_config, _tail_rows_config
    for dt in ("bf16", "fp32"):
        sig = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", out_ptr=f"*{dt}", self_ptr="*fp32",
                   prefix_ptr="*fp32", ent_ptr="*fp32", cls_ptr="*fp32",
                   **{f"stride_{t}{a}": "i32" for t in "qkvo" for a in "bht"}, stride_bh="i32", stride_bt="i32",
                   H="i32", T="i32", P="i32", d="i32", qk_scale="fp32", q_start="i32")
        # as launched without a bias: bias_ptr=None is a constexpr
        no_bias = dict(HAS_BIAS=False, bias_ptr=None)
        for d in (32, 64, 80, 128):
            cfg = _launch_config(d, dt == "fp32")
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            mask_d = cfg["BD"] != d  # as launched: no head-dim mask for a power-of-two d
            variants = [("", dict(PEEL_TAIL=False, MASK_D=mask_d))]
            if dt == "bf16" and d in (64, 80):  # the tuner's other key loop: tail block peeled
                variants += [(" peel", dict(PEEL_TAIL=True, MASK_D=mask_d))]
            for name, extra in variants:
                yield (f"attn {dt} d={d}{name}", attention_stats_fwd_kernel, sig,
                       dict(UPCAST=dt == "fp32", F32_PRECISION="tf32x3", **cfg, **extra, **no_bias), warps, stages)
            if dt == "bf16":  # the second launch for the last <= 32 query rows (16 rows: ViT-B/H/L)
                for rows, tuned in ((5, {}), (5, dict(num_warps=2, BN=32)), (32, {}), (32, dict(num_warps=2, BN=64))):
                    tail = dict(_tail_rows_config(rows, cfg["BD"]), **tuned)  # the untuned config, then tuned ones
                    tw, ts = tail.pop("num_warps"), tail.pop("num_stages")
                    yield (f"attn {dt} d={d} tail BM={tail['BM']} BN={tail['BN']}", attention_stats_fwd_kernel, sig,
                           dict(UPCAST=False, F32_PRECISION="tf32x3", BD=cfg["BD"], MASK_D=mask_d, **tail, **no_bias), tw, ts)

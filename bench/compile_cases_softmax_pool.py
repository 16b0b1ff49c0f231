"""Hopper compile cases for softmax_pool and the depth-2 scorer mlp_scores (used by compile_report)."""


def softmax_pool_cases():
    from ..kernels.softmax_pool import softmax_pool_bwd_kernel, softmax_pool_fwd_kernel
    from ..ops.softmax_pool import _bwd_configs, _fwd_configs, _launch_config
    dot = dict(LOWP=True, F32_PRECISION="tf32x3")
    for dt in ("bf16", "fp32"):
        fwd = dict(s_ptr="*fp32", x_ptr=f"*{dt}", out_ptr=f"*{dt}", out32_ptr="*fp32", lse_ptr="*fp32",
                   stride_xb="i64", stride_xt="i64", P="i32", N="i32", D="i32", K="i32")
        bwd = dict(s_ptr="*fp32", x_ptr=f"*{dt}", lse_ptr="*fp32", out32_ptr="*fp32", dout_ptr=f"*{dt}",
                   ds_ptr="*fp32", dx_ptr=f"*{dt}", stride_xb="i64", stride_xt="i64", stride_dxb="i64",
                   stride_dxt="i64", P="i32", N="i32", D="i32", K="i32", NTS="i32")
        settings = dot if dt == "bf16" else dict(LOWP=False, F32_PRECISION="tf32x3")
        for D, K in ((768, 1), (768, 4), (768, 16), (1024, 16)):
            fp32 = dt == "fp32"
            if fp32 and D != 768:
                continue
            base = _launch_config(D, K, fp32)
            tiles = dict(BK=base["BK"], SINGLE=K == 1, **settings)
            # every config of the autotune lists at ViT-B bf16, the default elsewhere
            fwd_cfgs = _fwd_configs(D, K, fp32) if (D, dt) == (768, "bf16") else _fwd_configs(D, K, fp32)[:1]
            for cfg in fwd_cfgs:
                yield (f"sp fwd {dt} K={K} D={D} BC={cfg['BC']} BT={cfg['BT']}", softmax_pool_fwd_kernel, fwd,
                       dict(STORE_F32=not fp32, BN=base["BN"], BC=cfg["BC"], BT=cfg["BT"], **tiles),
                       cfg["num_warps"], 2)
            bwd_cfgs = _bwd_configs(D, K, fp32) if (D, dt) == (768, "bf16") else _bwd_configs(D, K, fp32)[:1]
            for cfg in bwd_cfgs:
                for dx in (False, True):
                    yield (f"sp bwd{'+dx' if dx else ''} {dt} K={K} D={D} BC={cfg['BC']} BT={cfg['BT']}",
                           softmax_pool_bwd_kernel, bwd,
                           dict(HAS_DS=True, HAS_DX=dx, BC=cfg["BC"], BT=cfg["BT"], **tiles), cfg["num_warps"], 2)


def mlp_scores_cases():
    from ..kernels.mlp_scores import mlp_scores_bwd_kernel, mlp_scores_fwd_kernel
    from ..ops.mlp_scores import _configs, _launch_config
    fwd = dict(x_ptr="*bf16", w1_ptr="*bf16", b1_ptr="*fp32", w2_ptr="*fp32", b2_ptr="*fp32", s_ptr="*fp32",
               stride_xb="i64", stride_xt="i64", P="i32", N="i32", M="i32", D="i32", DH="i32", K="i32")
    bwd = dict(x_ptr="*bf16", w1_ptr="*bf16", b1_ptr="*fp32", w2_ptr="*fp32", ds_ptr="*fp32", dpre_ptr="*bf16",
               part_ptr="*fp32", stride_xb="i64", stride_xt="i64", stride_part="i32", b0="i32", P="i32", N="i32",
               M="i32", T="i32", D="i32", DH="i32", K="i32")
    settings = dict(LOWP=True, F32_PRECISION="tf32x3")
    for D, K in ((768, 1), (768, 4), (1024, 1)):
        BK = _launch_config(D, D, K)["BK"]
        for backward in (False, True):
            cfgs = _configs(D, D, K, backward) if (D, K) == (768, 1) else _configs(D, D, K, backward)[:1]
            for cfg in cfgs:
                for act in ((0, 1) if (D, K) == (768, 1) else (0,)):
                    tiles = dict(BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], BK=BK, SINGLE=K == 1, ACT=act,
                                 FAST_TANH=act == 0, HAS_B1=True, **settings)
                    name = (f"mlp {'bwd' if backward else 'fwd'} {'tanh' if act == 0 else 'relu'} K={K} D={D} "
                            f"{cfg['BM']}x{cfg['BN']}x{cfg['BD']}")
                    if backward:
                        yield (name, mlp_scores_bwd_kernel, bwd, tiles, cfg["num_warps"], cfg["num_stages"])
                    else:
                        yield (name, mlp_scores_fwd_kernel, fwd, dict(tiles, HAS_B2=True), cfg["num_warps"],
                               cfg["num_stages"])

"""Compile the kernels for Hopper (sm_90) on any machine and report registers and spills.

No GPU needed: Triton lowers to PTX and its bundled ptxas assembles it, so compile errors
the interpreter lets through and register spills show up here before a device run.
Usage: python -m selagg_fast.bench.compile_report
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def _ptxas() -> str:
    from triton.backends.nvidia import compiler as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def _aligned_attrs(fn, signature: dict, extra_aligned=()) -> dict:
    """Divisibility hints as a real launch gets them: Triton's JIT marks 16-aligned pointers and
    ints divisible by 16 (the contiguous-tensor strides and feature dims of every shape here),
    which is what lets it vectorise loads and stage them asynchronously. Without the hints the
    compile would model 2-byte scalar loads, not what runs."""
    names = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride_") or n in ("D", "d")]
    names += list(extra_aligned)
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if n in signature}


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                   extra_aligned=()) -> dict:
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_aligned_attrs(fn, signature, extra_aligned))
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    info = res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    ptx_text = compiled.asm["ptx"]
    return {"regs": int(regs.group(1)) if regs else -1, "spill_bytes": int(spill.group(1)) if spill else -1,
            "shared": compiled.metadata.shared,
            # which matrix instructions and whether the token/key loads are staged asynchronously
            "mma": "wgmma" if "wgmma.mma_async" in ptx_text else ("mma.sync" if "mma.sync" in ptx_text else "-"),
            "async_copy": "cp.async" in ptx_text}


def _abmilp_cases():
    from ..kernels import abmilp as k
    from ..ops.abmilp import single_config, split_configs
    base = dict(x_ptr="*bf16", w_ptr="*fp32", bias_ptr="*fp32")
    multi = dict(w_ptr="*bf16")
    fwd = dict(base, out_ptr="*bf16", out32_ptr="*fp32", lse_ptr="*fp32", s_ptr="*fp32", stats_ptr="*fp32",
               stride_xb="i64", stride_xt="i64", P="i32", N="i32", D="i32", eps="fp32")
    bwd = dict(base, stats_ptr="*fp32", lse_ptr="*fp32", out32_ptr="*fp32", dout_ptr="*bf16", dx_ptr="*bf16",
               dw_ptr="*fp32",
               db_ptr="*fp32", stride_xb="i64", stride_xt="i64", stride_dxb="i64", stride_dxt="i64",
               stride_part="i32", B="i32", P="i32", N="i32", D="i32")
    # the K=1 backward reads the saved scores instead of the bias
    bwd1 = dict(x_ptr="*bf16", w_ptr="*fp32", s_ptr="*fp32",
                **{k: v for k, v in bwd.items() if k not in ("x_ptr", "w_ptr", "bias_ptr")})
    fwd1 = fwd
    dot = dict(LOWP=True, F32_PRECISION="tf32x3")
    for D in (384, 768, 1024, 1280):
        cfg = single_config(D)
        tiles = dict(BT=cfg["BT"], BD=cfg["BD"])
        for std in (False, True) if D == 768 else (False,):  # standardize: ViT-B (attentive probing)
            tag = " std" if std else ""
            for prefetch in (False, True):
                yield (f"fwd K=1 D={D}" + (" prefetch" if prefetch else "") + tag, k.abmilp_fwd_single_kernel, fwd1,
                       dict(HAS_BIAS=True, STORE_F32=True, STORE_SCORES=False, PREFETCH=prefetch, STANDARDIZE=std,
                            STORE_STATS=std, **tiles), cfg["num_warps"])
            for dx in (False, True):
                yield (f"bwd{'+dx' if dx else ''} K=1 D={D}{tag}", k.abmilp_bwd_single_kernel, bwd1,
                       dict(HAS_DX=dx, STANDARDIZE=std, **tiles), cfg["num_warps"])
    for bt, warps in ((2, 1), (4, 2)):  # the smallest programs of the K=1 autotune list, at ViT-B
        tiles = dict(BT=bt, BD=1024)
        yield (f"fwd K=1 D=768 BT={bt} {warps} warp(s)", k.abmilp_fwd_single_kernel, fwd1,
               dict(HAS_BIAS=True, STORE_F32=True, STORE_SCORES=False, PREFETCH=False, STANDARDIZE=False,
                    STORE_STATS=False, **tiles), warps)
        yield (f"bwd K=1 D=768 BT={bt} {warps} warp(s)", k.abmilp_bwd_single_kernel, bwd1,
               dict(HAS_DX=False, STANDARDIZE=False, **tiles), warps)
    # the split kernels at every config of their autotune list (ViT-B, K=4: the probe trainer's
    # four selective lrs; K=16 also stands for 12-head attentive probing, same BK), plus the
    # default at other shapes and float32 tokens; standardize at ViT-B K=16 (its autotune list)
    f32 = dict(x_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", dout_ptr="*fp32", dx_ptr="*fp32")
    for D, K, dt in [(768, 16, "bf16"), (768, 4, "bf16"), (1280, 4, "bf16"), (768, 4, "fp32")]:
        configs = split_configs(D, K, fp32=dt == "fp32")
        for cfg in configs if (D, dt) == (768, "bf16") else configs[:1]:
            def sig(base):
                over = f32 if dt == "fp32" else {}
                return {n: over.get(n, t) for n, t in dict(base, K="i32", **multi).items()}
            ce = dict(BT=cfg["BT"], BC=cfg["BC"], BK=cfg["BK"], WHOLE=cfg.get("WHOLE", False),
                      **(dict(LOWP=False, F32_PRECISION="tf32x3") if dt == "fp32" else dot))
            tag = f"K={K} D={D} {dt} split BC={cfg['BC']} BT={cfg['BT']}" + (" WHOLE" if cfg.get("WHOLE") else "") + (
                f" s{cfg['num_stages']}" if "num_stages" in cfg else "")
            stages = cfg.get("num_stages", 2)  # the autotuner's default (ops/_dispatch.launcher)
            stds = (False, True) if (D, K, dt) == (768, 16, "bf16") and cfg in split_configs(
                D, K, fp32=False, standardize=True) else (False,)
            for std in stds:
                t = tag + (" std" if std else "")
                yield (f"fwd {t}", k.abmilp_fwd_split_kernel, sig(fwd),
                       dict(HAS_BIAS=True, STORE_F32=dt != "fp32", STORE_SCORES=False, STANDARDIZE=std,
                            STORE_STATS=std, **ce),
                       cfg["num_warps"], stages)
                for dx in (False, True):
                    yield (f"bwd{'+dx' if dx else ''} {t}", k.abmilp_bwd_split_kernel, sig(bwd),
                           dict(HAS_BIAS=True, HAS_DX=dx, STANDARDIZE=std, **ce), cfg["num_warps"], stages)


def main() -> None:
    cases = list(_abmilp_cases())
    try:
        from .compile_cases_attention import attention_cases
        cases += list(attention_cases())
        from .compile_cases_softmax_pool import mlp_scores_cases, softmax_pool_cases
        cases += [*softmax_pool_cases(), *mlp_scores_cases()]
    except ImportError:
        pass
    from ..kernels.norms import token_norm_ratio_kernel
    from ..ops._dispatch import token_tile
    for D in (768, 1280):  # the analysis' magnitude ratio: bf16 attention branch over a float32 residual
        tile = token_tile(D)  # as ops/norms.py launches it
        cases.append((f"norm ratio D={D}", token_norm_ratio_kernel,
                      dict(num_ptr="*bf16", den_ptr="*fp32", out_ptr="*fp32", stride_nb="i32", stride_nt="i32",
                           stride_db="i32", stride_dt="i32", T="i32", D="i32"),
                      dict(BT=tile["BT"], BD=tile["BD"]), tile["num_warps"]))
    from ..kernels.columns import attention_columns_kernel
    from ..ops.columns import columns_config
    for T in (197, 577):  # the analysis' per-block columns
        cfg = columns_config(T)  # as ops/columns.py launches it
        cases.append((f"attention columns T={T}", attention_columns_kernel,
                      dict(rows_ptr="*fp32", prev_ptr="*fp64", part_ptr="*fp64", B="i32", H="i32", T="i32",
                           P="i32"),
                      dict(HAS_CLS=True, HAS_PREV=True, BB=cfg["BB"], BT=cfg["BT"]), cfg["num_warps"]))
    print(f"{'kernel':<44} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem':>7} {'mma':>8} {'async':>5}")
    for name, fn, sig, ce, warps, *stages in cases:  # an optional 6th item: num_stages of the launch
        try:
            r = compile_kernel(fn, sig, ce, warps, *stages)
            print(f"{name:<44} {warps:>5} {r['regs']:>5} {r['spill_bytes']:>8} {r['shared']:>7} {r['mma']:>8} "
                  f"{'yes' if r['async_copy'] else 'no':>5}")
        except Exception as e:  # report and go on: one broken config should not hide the others
            print(f"{name:<44} {warps:>5} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()

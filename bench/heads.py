"""`selagg-fast bench heads`: one probe training step per aggregation head, fused vs its peers.

A probe step on frozen tokens: head forward + BatchNorm1d(affine=False) + Linear(D, 1000) +
cross-entropy, backward (the tokens need no gradient). Heads: ``selective`` (linear AbMILP),
``ap1``, ``ap12``, ``ap12_ln`` (attentive probes computed through the fold), ``ep32`` (efficient
probing, 32 queries, through the fold), MLP-Tanh (depth-2 scorer) and SA-AbMILP (self-attention
"both" + MLP-Tanh scorer). Providers:

- fused: the package's module (on a CPU without the Triton interpreter its ops take their
  PyTorch reference path; the AP fold is then the eager fold);
- eager: the eager reference (``AttentivePooling(backend="reference")`` for AP, the paper
  code's formulation of the AbMILP head for the selective family);
- compiled: ``torch.compile`` of the eager reference;
- timm / timm compiled: timm's ``AttentionPoolLatent`` (AP heads; ``ap12_ln`` behind a token
  ``nn.LayerNorm``), given contiguous patch tokens prepared outside the step;
- peer / peer compiled: the efficient-probing code's ``EfficientProbing`` written out eagerly
  (``PeerEfficientProbing``: a value projection of every token), given the patch tokens.

Also: 4 learning rates of ``ap12`` in one pass (the 4 modules' folded queries as branches of
one ``abmilp_pool`` call) vs one ``ap12`` and vs 4 separate timm pools; the MLP-Tanh scorer's
hidden-layer GEMMs alone (forward ``x·W1ᵀ`` and the ``dW1`` GEMM); the head alone (forward +
backward, no probe) for ``ap12`` vs timm and for ``ep32`` vs the peer, the CPU targets' measure.

Targets (ViT-B tokens B=1024 bf16 on an H100/H200): ap12 >= 5x timm eager and >= 2x
timm compiled, <= 1/4 of timm's peak extra memory, <= 1.6x the selective step; ap12 x 4 lrs in
one pass <= 1.3x one ap12; MLP-Tanh <= 1.3x its hidden GEMMs alone, <= 1/3 of the eager
reference's peak. On a CPU (ViT-S, B=64, float32): the folded ap12 head forward + backward
>= 6x faster than timm's. Efficient probing: the ep32 step <= 1.5x the selective step on the GPU
(a prediction until measured); on a CPU at ViT-B width (B=64, T=197, float32) the folded ep32
head forward + backward >= 4x faster than the peer's eager module.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from selagg_fast import AttentivePooling, EfficientProbing, SelectiveAggregation
from selagg_fast.branches import pool_branches
from selagg_fast.probe.heads import LinearProbe  # the trainer's own BatchNorm + Linear

from .common import abmilp_pool_eager, bench_ms, environment, peak_extra_mib, print_banner, print_table, write_csv

# (name, B, T, D): the target GPU shape first; FULL adds ViT-S and ViT-L
GPU_SHAPES = [("ViT-B", 1024, 197, 768), ("ViT-S", 1024, 197, 384), ("ViT-L", 1024, 197, 1024)]
CPU_SHAPE = ("ViT-S", 64, 197, 384)
EP_CPU_SHAPE = ("ViT-B", 64, 197, 768)  # the EP CPU target's shape
NUM_CLASSES, P, LRS = 1000, 1, 4
# the heads (selective, ap1, ap12, ap12_ln, mlp_tanh, sa_abmilp) and the extra rows, measured in this
# order: the rows behind the GPU targets first
TASKS = ("ap12", "selective", "ep32", f"ap12 x {LRS} lrs", "mlp_tanh", "mlp_tanh hidden GEMMs", "ap1", "ap12_ln",
         "sa_abmilp")
CPU_ROUNDS = 5  # interleaved rounds on a CPU (a shared machine's load drifts); the median is reported


class EagerReferenceHead(nn.Module):
    """The paper code's ABMILPHead, eagerly: [self-attention] -> scorer -> softmax -> (v * a).sum(1).

    Same state-dict keys as ``SelectiveAggregation``'s variants (``attention_predictor.*``,
    ``self_attn.qkv.weight``, ``self_attn.proj.*``), so one loads the other's parameters.
    """

    def __init__(self, dim: int, depth: int, self_attention: str):
        super().__init__()
        layers = [nn.Linear(dim, dim), nn.Tanh()] if depth == 2 else []
        self.attention_predictor = nn.Sequential(*layers, nn.Linear(dim, 1))
        self.self_attention = self_attention
        if self_attention != "none":
            self.self_attn = nn.Module()
            self.self_attn.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.self_attn.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        z = tokens[:, P:]
        u = v = z
        if self.self_attention != "none":
            q, k, val = self.self_attn.qkv(z).chunk(3, dim=-1)
            attn = torch.softmax(q @ k.transpose(-2, -1) * z.shape[-1] ** -0.5, dim=-1)
            y = self.self_attn.proj(attn @ val)
            u = y
            v = y if self.self_attention == "both" else z
        a = torch.softmax(self.attention_predictor(u).float(), dim=1)  # [B, N, 1]
        return (v * a).sum(1)


class PeerEfficientProbing(nn.Module):
    """The efficient-probing code's ``EfficientProbing`` (one head, no value bias, d_out = 1),
    eagerly: a value projection of every token, per query ``softmax(q_m · x_t / √D)`` applied to
    its slice of the values. Same state-dict keys as ``EfficientProbing``."""

    def __init__(self, dim: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.v = nn.Linear(dim, dim, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)

    def forward(self, x):
        B, N, D = x.shape
        Q = self.num_queries
        q = self.cls_token.expand(B, -1, -1) * D ** -0.5
        attn = torch.softmax(q @ x.transpose(1, 2), dim=-1)  # [B, Q, N]
        values = self.v(x).reshape(B, N, Q, D // Q).permute(0, 2, 1, 3)  # [B, Q, N, D/Q]
        return (attn.unsqueeze(2) @ values).reshape(B, D)


def _timm_pool(D: int, H: int) -> nn.Module:
    from timm.layers.attention_pool import AttentionPoolLatent
    return AttentionPoolLatent(D, num_heads=H, mlp_ratio=4.0, qkv_bias=True, latent_len=1, norm_layer=nn.LayerNorm)


VARIANTS = {"selective": {}, "mlp_tanh": dict(depth=2, activation="tanh"),
            "sa_abmilp": dict(depth=2, activation="tanh", self_attention="both")}  # SelectiveAggregation kwargs


def _step(heads: list, modules: nn.Module, tokens, labels, autocast):
    """One probe step: every (head_fn, probe) pair on ``tokens``; losses summed; grads cleared."""
    def step():
        with autocast():
            loss = sum(F.cross_entropy(probe(head(tokens)), labels) for head, probe in heads)
        loss.backward()
        modules.zero_grad(set_to_none=True)
    return step


def _head_only(head, modules, tokens, grad):
    """Head forward + backward with a given output gradient (no probe): the CPU target's measure."""
    def step():
        out = head(tokens)
        out.backward(grad.to(out.dtype))
        modules.zero_grad(set_to_none=True)
    return step


def _cpu_times(fn, budget_s: float = 0.6) -> tuple:
    """Median wall ms and median process-CPU ms of ``fn`` (CPU time is steadier on a shared machine)."""
    fn()
    wall, cpu = [], []
    deadline = time.perf_counter() + budget_s
    while len(wall) < 3 or (time.perf_counter() < deadline and len(wall) < 30):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _build(name: str, D: int, device, tokens, patches, compile_: bool, notes: list) -> dict:
    """{provider: (head_fn, modules)} for one head name."""
    providers = {}
    if name.startswith("ep"):
        ours = EfficientProbing(D, int(name[2:]), num_prefix_tokens=P).to(device)
        providers["fused"] = (ours, ours)
        providers["eager"] = (lambda t, m=ours: m(t, backend="reference"), ours)
        if compile_:
            providers["compiled"] = (torch.compile(lambda t, m=ours: m(t, backend="reference")), ours)
        peer = PeerEfficientProbing(D, ours.num_queries).to(device)
        peer.load_state_dict(ours.state_dict())
        providers["peer"] = (lambda t, m=peer: m(patches), peer)
        if compile_:
            compiled = torch.compile(peer)
            providers["peer compiled"] = (lambda t, m=compiled: m(patches), peer)
        return providers
    if name.startswith("ap"):
        H = 1 if name == "ap1" else 12
        token_norm = name.endswith("_ln")
        ours = AttentivePooling(D, H, token_norm=token_norm, num_prefix_tokens=P).to(device)
        providers["fused"] = (ours, ours)
        providers["eager"] = (lambda t, m=ours: m(t, backend="reference"), ours)
        if compile_:
            providers["compiled"] = (torch.compile(lambda t, m=ours: m(t, backend="reference")), ours)
        pool = _timm_pool(D, H)
        timm_head = nn.Sequential(nn.LayerNorm(D, eps=1e-6), pool) if token_norm else pool
        timm_head = timm_head.to(device)
        providers["timm"] = (lambda t, m=timm_head: m(patches), timm_head)
        if compile_:
            compiled = torch.compile(timm_head)
            providers["timm compiled"] = (lambda t, m=compiled: m(patches), timm_head)
        return providers
    head = SelectiveAggregation(D, 1, P, **VARIANTS[name]).to(device)
    providers["fused"] = (head, head)
    if name == "selective":
        eager_fn = (lambda t, m=head: abmilp_pool_eager(t, m.weight.view(D), m.bias.view(()), P))
        eager_mod = head
    else:
        eager_mod = EagerReferenceHead(D, 2, "both" if name == "sa_abmilp" else "none").to(device)
        eager_mod.load_state_dict({k: v for k, v in head.state_dict().items() if k != "pos_embed"})
        eager_fn = eager_mod
    providers["eager"] = (eager_fn, eager_mod)
    if compile_:
        providers["compiled"] = (torch.compile(eager_fn), eager_mod)
    return providers


def run(quick: bool = False, with_compile: bool = True, csv_path: str = "bench/out/heads.csv") -> list:
    env = environment()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    print_banner("Heads benchmark", env)
    if not cuda:
        print("No CUDA device: the CPU table at ViT-S, B=64, float32 (the package's ops take their PyTorch "
              "reference path: 'fused' is the eager fold for AP); GPU figures need CUDA.")
        with_compile = False
    shapes = (GPU_SHAPES[:1] if quick else GPU_SHAPES) if cuda else [CPU_SHAPE]
    label = env["device"] if cuda else f"CPU, {torch.get_num_threads()} threads"

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def measure(fn):
        if cuda:
            ms, lo, hi = bench_ms(fn)
            return dict(ms=ms, lo=lo, hi=hi, peak_MiB=peak_extra_mib(fn))
        wall, cpu = _cpu_times(fn)
        return dict(ms=wall, cpu_ms=cpu)

    rows, notes = [], []
    for shape, B, T, D in shapes:
        torch.manual_seed(0)
        tokens = torch.randn(B, T, D, device=device, dtype=dtype)
        patches = tokens[:, P:].contiguous()  # timm's input, prepared outside the step
        labels = torch.randint(0, NUM_CLASSES, (B,), device=device)
        base = dict(shape=shape, B=B, T=T, D=D, dtype=str(dtype).replace("torch.", ""))
        shape_rows = []

        def add(head, provider, mode, fn):
            try:
                r = dict(base, head=head, provider=provider, mode=mode, **measure(fn))
            except Exception as e:  # a peer that cannot run here (a compile failure) is a note, not an abort
                notes.append(f"{head} / {provider} / {mode}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                return
            shape_rows.append(r)
            print(f"  {shape} {head:>22} {provider:>14} {mode:>12}: {r['ms']:.3f} ms", flush=True)

        # the rows that carry the targets first: a run cut short keeps them (CSV after each task)
        print(f"Heads probe step ({label}), {shape} tokens B={B} T={T} D={D} {base['dtype']}, as measured:")
        for task in TASKS:
            if task == "ap12 x 4 lrs":
                # one abmilp_pool call for the 4 modules' folded queries vs 4 separate timm pools
                mods = nn.ModuleList([AttentivePooling(D, 12, num_prefix_tokens=P) for _ in range(LRS)]).to(device)
                probes = nn.ModuleList([LinearProbe(D, NUM_CLASSES) for _ in range(LRS)]).to(device)
                add(task, "fused (1 pass)", "step", _grouped_step(mods, probes, tokens, labels, autocast))
                pools = nn.ModuleList([_timm_pool(D, 12) for _ in range(LRS)]).to(device)
                add(task, f"timm ({LRS} pools)", "step",
                    _step([(lambda t, m=m: m(patches), p) for m, p in zip(pools, probes)],
                          nn.ModuleList([pools, probes]), tokens, labels, autocast))
                del mods, probes, pools
            elif task == "mlp_tanh hidden GEMMs":
                # MLP-Tanh's hidden layer alone: h = x W1ᵀ over the patch tokens, and dW1 = dhᵀ x
                x2 = patches.view(-1, D)
                w1 = torch.randn(D, D, device=device, dtype=dtype) * D ** -0.5
                dh = torch.randn_like(x2)
                add(task, "torch", "x W1^T + dW1", lambda: (x2 @ w1.t(), dh.t() @ x2))
                del x2, dh
            else:
                name = task
                compile_here = with_compile and (not quick or name == "ap12")
                providers = _build(name, D, device, tokens, patches, compile_here, notes)
                for provider, (head_fn, mods) in providers.items():
                    probe = LinearProbe(D, NUM_CLASSES).to(device)
                    add(name, provider, "step", _step([(head_fn, probe)], nn.ModuleList([mods, probe]),
                                                      tokens, labels, autocast))
                if name in ("ap12", "ep32"):  # the head alone (the CPU targets' measure): fused vs its peer
                    grad = torch.randn(B, D, device=device)
                    for provider in ("fused", _PEER[name]):
                        fn, mods = providers[provider]
                        with_ac = (lambda f: (lambda t: _autocast_call(autocast, f, t)))(fn)
                        add(name, provider, "head fwd+bwd", _head_only(with_ac, mods, tokens, grad))
                    if not cuda and name == "ap12":  # the CPU target, interleaved rounds: medians of medians
                        _cpu_target(name, providers, tokens, grad, shape_rows, base)
                del providers
            write_csv(csv_path, [dict(r, **env) for r in rows + shape_rows])
        del tokens, patches
        _speedups(shape_rows)
        rows += shape_rows
        print_table(shape_rows, ["head", "provider", "mode", "ms", "cpu_ms" if not cuda else "peak_MiB",
                                 "fused_speedup", "vs_ap12", "vs_selective"],
                    title=f"Heads probe step ({label}), {shape} tokens B={B} T={T} D={D} "
                          f"{base['dtype']}: median ms; fused_speedup = this provider's time / fused")
        if cuda:
            torch.cuda.empty_cache()
        write_csv(csv_path, [dict(r, **env) for r in rows])
        print(f"\nIssue 12 / 20 targets at {shape} ({label}):")
        for what, value, op, goal in targets(shape_rows, cuda):
            shown = "-" if value is None else f"{value:.3f}"
            verdict = "not measured" if value is None else ("met" if _OPS[op](value, goal) else "MISSED")
            print(f"  {what:<58}{shown:>9}  {op} {goal:g}  {verdict}")
    if not cuda:
        rows += _ep_cpu_target(env)
        write_csv(csv_path, [dict(r, **env) for r in rows])
    for n in notes:
        print(f"note: {n}")
    return [dict(r, **env) for r in rows]


def _autocast_call(autocast, fn, t):
    with autocast():
        return fn(t)


def _grouped_step(mods, probes, tokens, labels, autocast):
    """Several AttentivePooling modules as branches of ONE abmilp_pool call (as ProbeHeads groups them)."""
    sizes = [m.num_heads for m in mods]

    def step():
        with autocast():
            u = torch.cat([m.branch_weights()[0] for m in mods])
            pooled = pool_branches(tokens, u, None, num_prefix_tokens=P)
            loss = sum(F.cross_entropy(probe(m.finish(p)), labels)
                       for m, probe, p in zip(mods, probes, pooled.split(sizes, dim=1)))
        loss.backward()
        mods.zero_grad(set_to_none=True)
        probes.zero_grad(set_to_none=True)
    return step


_PEER = {"ap12": "timm", "ep32": "peer"}
_GOAL = {"ap12": 6.0, "ep32": 4.0}


def _ep_cpu_target(env) -> list:
    """The efficient-probing CPU target at ViT-B width: the ep32 head forward + backward, folded vs the peer."""
    shape, B, T, D = EP_CPU_SHAPE
    torch.manual_seed(0)
    tokens = torch.randn(B, T, D)
    patches = tokens[:, P:].contiguous()
    base = dict(shape=shape, B=B, T=T, D=D, dtype="float32")
    rows: list = []
    _cpu_target("ep32", _build("ep32", D, "cpu", tokens, patches, False, []), tokens, torch.randn(B, D), rows, base)
    print_table(rows, ["head", "provider", "mode", "ms", "cpu_ms"],
                title=f"EP CPU target ({shape} width, B={B} T={T} float32, {torch.get_num_threads()} threads)")
    return rows


def _cpu_target(name, providers, tokens, grad, rows, base) -> None:
    """One head's forward + backward, folded vs its peer, CPU_ROUNDS interleaved rounds."""
    peer = _PEER[name]
    fns = {p: _head_only(*providers[p], tokens, grad) for p in ("fused", peer)}
    wall, cpu = {p: [] for p in fns}, {p: [] for p in fns}
    for _ in range(CPU_ROUNDS):
        for p, fn in fns.items():
            w, c = _cpu_times(fn)
            wall[p].append(w)
            cpu[p].append(c)
    for p in fns:
        rows.append(dict(base, head=name, provider=p, mode=f"head x{CPU_ROUNDS} rounds",
                         ms=statistics.median(wall[p]), cpu_ms=statistics.median(cpu[p])))
    ratio = statistics.median(wall[peer]) / statistics.median(wall["fused"])
    ratio_cpu = statistics.median(cpu[peer]) / statistics.median(cpu["fused"])
    what = {"ap12": "timm's AttentionPoolLatent", "ep32": "the peer's eager EfficientProbing"}[name]
    print(f"CPU target ({base['shape']}): folded {name} forward + backward vs {what}: {ratio:.1f}x (wall), "
          f"{ratio_cpu:.1f}x (process CPU time), medians of {CPU_ROUNDS} interleaved rounds; "
          f"target >= {_GOAL[name]:g}x: {'met' if ratio >= _GOAL[name] else 'MISSED'} (wall)")


_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}


def _get(rows, column, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            v = r.get(column)
            return None if v is None or v != v else v
    return None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def targets(rows: list, cuda: bool) -> list:
    """(what, measured or None, comparison, goal) for the heads' targets, from one shape's rows."""
    step = lambda head, provider, col="ms": _get(rows, col, head=head, provider=provider, mode="step")
    if not cuda:
        fused = _get(rows, "ms", head="ap12", provider="fused", mode=f"head x{CPU_ROUNDS} rounds")
        timm = _get(rows, "ms", head="ap12", provider="timm", mode=f"head x{CPU_ROUNDS} rounds")
        timm_cpu = _get(rows, "cpu_ms", head="ap12", provider="timm", mode=f"head x{CPU_ROUNDS} rounds")
        fused_cpu = _get(rows, "cpu_ms", head="ap12", provider="fused", mode=f"head x{CPU_ROUNDS} rounds")
        return [("CPU: ap12 head fwd+bwd, timm / folded (wall)", _ratio(timm, fused), ">=", 6.0),
                ("CPU: ap12 head fwd+bwd, timm / folded (process CPU time)", _ratio(timm_cpu, fused_cpu), ">=", 6.0)]
    gemms = _get(rows, "ms", head="mlp_tanh hidden GEMMs")
    return [
        ("ap12 step: timm eager / fused", _ratio(step("ap12", "timm"), step("ap12", "fused")), ">=", 5.0),
        ("ap12 step: timm compiled / fused", _ratio(step("ap12", "timm compiled"), step("ap12", "fused")), ">=", 2.0),
        ("ap12 step peak: fused / timm", _ratio(step("ap12", "fused", "peak_MiB"), step("ap12", "timm", "peak_MiB")),
         "<=", 0.25),
        ("ap12 step / selective step", _ratio(step("ap12", "fused"), step("selective", "fused")), "<=", 1.6),
        ("ep32 step / selective step (issue 20)", _ratio(step("ep32", "fused"), step("selective", "fused")), "<=", 1.5),
        (f"ap12 x {LRS} lrs one pass / one ap12", _ratio(step(f"ap12 x {LRS} lrs", "fused (1 pass)"),
                                                       step("ap12", "fused")), "<=", 1.3),
        ("mlp_tanh step / its hidden GEMMs alone", _ratio(step("mlp_tanh", "fused"), gemms), "<=", 1.3),
        ("mlp_tanh step peak: fused / eager", _ratio(step("mlp_tanh", "fused", "peak_MiB"),
                                                   step("mlp_tanh", "eager", "peak_MiB")), "<=", 0.333),
    ]


def _speedups(rows: list) -> None:
    """fused_speedup (a provider's time over fused's, same head and mode), vs_ap12 and vs_selective."""
    fused = {(r["head"], r["mode"]): r["ms"] for r in rows if r["provider"].startswith("fused")}
    for r in rows:
        f = fused.get((r["head"], r["mode"]))
        r["fused_speedup"] = r["ms"] / f if f else math.nan
    ap12 = fused.get(("ap12", "step"))
    sel = fused.get(("selective", "step"))
    for r in rows:
        if r["provider"].startswith("fused") or r["provider"] == "torch":
            r["vs_ap12"] = r["ms"] / ap12 if ap12 else math.nan
            r["vs_selective"] = r["ms"] / sel if sel else math.nan

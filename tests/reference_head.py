"""An eager transcription of the paper code's ``ABMILPHead`` (its five switches), the independent
reference of tests/test_variants.py. Follows docs/semantics.md ("The Selective Aggregation head's configurations")
line by line: explicit softmax attention, MAE's numpy sin-cos table, state-dict
keys as the reference's. Test-only: the library never imports it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """MAE util/pos_embed.py: [(1 +) g*g, D]; first half of the channels from the column."""
    assert embed_dim % 4 == 0
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class Attention(nn.Module):
    """timm's Attention with qkv_bias=False: logits q k^T * d^-1/2 per head, softmax over the keys,
    proj. One head of width D unless told (docs/semantics.md)."""

    def __init__(self, dim: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ABMILPHead(nn.Module):
    def __init__(self, dim: int, self_attention_apply_to: str = "none", activation: str = "tanh", depth: int = 2,
                 cond: str = "none", content: str = "all", num_patches: int = 196, attention_branches: int = 1,
                 num_heads: int = 1):
        super().__init__()
        self.cond, self.self_attention_apply_to, self.content = cond, self_attention_apply_to, content
        self.pos_embed = nn.Parameter(torch.from_numpy(get_2d_sincos_pos_embed(
            dim, int(num_patches ** .5), cls_token=(content != "patch"))).float().unsqueeze(0), requires_grad=False)
        self.self_attn = Attention(dim, num_heads) if self_attention_apply_to != "none" else nn.Identity()
        layers = []
        for _ in range(depth - 1):
            layers.extend([nn.Linear(dim, dim), nn.Tanh() if activation == "tanh" else nn.ReLU()])
        layers.append(nn.Linear(dim, attention_branches))
        self.attention_predictor = nn.Sequential(*layers)

    def forward_with_attn_map(self, x):
        if self.content == "patch":
            x = x[:, 1:]
        x_attn = self.self_attn(x)
        predictor_input = x_attn if self.self_attention_apply_to in ("map", "both") else x
        if self.cond == "pe":
            predictor_input = predictor_input + self.pos_embed
        attn_map = F.softmax(self.attention_predictor(predictor_input), dim=1)  # [B, N', K]
        x_out = x_attn if self.self_attention_apply_to == "both" else x
        out = x_out.permute(0, 2, 1) @ attn_map  # [B, D, K]
        if out.shape[2] == 1:
            out = out.squeeze(2)
        return out, attn_map

    def forward(self, x):
        return self.forward_with_attn_map(x)[0]

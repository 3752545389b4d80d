"""Deformable transformer: multi-scale deformable encoder and decoder over P3..P6 (post-norm)."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from .config import ModelConfig
from .deformable_attention import MSDeformAttn


class FFN(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(torch.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(cfg.hidden_dim, cfg.num_levels, cfg.num_heads, cfg.num_points)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.ffn = FFN(cfg.hidden_dim, cfg.ffn_dim, cfg.dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                padding_mask: Tensor) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        return self.ffn(self.norm(src + self.dropout(attn)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.dropout1, self.norm1 = nn.Dropout(cfg.dropout), nn.LayerNorm(d)
        self.cross_attn = MSDeformAttn(d, cfg.num_levels, cfg.num_heads, cfg.num_points)
        self.dropout2, self.norm2 = nn.Dropout(cfg.dropout), nn.LayerNorm(d)
        self.ffn = FFN(d, cfg.ffn_dim, cfg.dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, memory_padding_mask: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        return self.ffn(self.norm2(tgt + self.dropout2(attn)))


def _flatten_levels(maps: list[Tensor]) -> Tensor:
    """[(B, C, H_l, W_l)] -> (B, sum H_l*W_l, C) in level order."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def valid_ratios(padding_mask: Tensor) -> Tensor:
    """(B, H, W) -> (B, 2) fraction (x, y) of the map covered by the image."""
    valid = ~padding_mask
    h = valid[:, :, 0].sum(1).float() / padding_mask.shape[1]
    w = valid[:, 0, :].sum(1).float() / padding_mask.shape[2]
    return torch.stack([w, h], -1)


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalized by the valid region -> (B, S, L, 2)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=ratios.device) + 0.5,
                                torch.arange(w, device=ratios.device) + 0.5, indexing="ij")
        ys = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([xs, ys], -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


class DeformableTransformer(nn.Module):
    """Encodes P3..P6 with deformable self-attention; decodes learned queries with their reference points."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.level_embed = nn.Parameter(torch.empty(cfg.num_levels, d))
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        # Each query: a learned (position, content) pair; its reference point is predicted from the position.
        self.query_embed = nn.Embedding(cfg.num_queries, 2 * d)
        self.reference_points = nn.Linear(d, 2)
        nn.init.normal_(self.level_embed)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]) -> dict[str, Tensor]:
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=srcs[0].device)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (B, L, 2)
        src = _flatten_levels(srcs)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos_embed = _flatten_levels([p + self.level_embed[i].view(1, -1, 1, 1) for i, p in enumerate(pos)])

        ref = encoder_reference_points(shapes, ratios)
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos_embed, ref, spatial_shapes, mask)

        B = memory.shape[0]
        query_pos, tgt = self.query_embed.weight.split(memory.shape[-1], dim=1)
        query_pos, tgt = query_pos.expand(B, -1, -1), tgt.expand(B, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2), normalized to the valid region
        ref_input = reference[:, :, None] * ratios[:, None]
        hidden = []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, mask)
            hidden.append(tgt)
        return {"hidden": torch.stack(hidden), "reference_points": reference, "memory": memory,
                "spatial_shapes": spatial_shapes, "valid_ratios": ratios}

"""Deformable transformer: multi-scale deformable encoder and decoder over P3..P6 (post-norm)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .deformable_attention import MSDeformAttn
from .denoising import DenoisingQueries, self_attention_mask
from .head import inverse_sigmoid
from .masked_ops import exporting
from .position_encoding import point_encoding


class FFN(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        # In place without autograd only: the linear's output is a view (3-D input), and an in-place op on it
        # would make the backward copy the whole tokens x ffn_dim gradient (CopySlices).
        h = torch.relu(h) if h.requires_grad else h.relu_()
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(h))))


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
                spatial_shapes: Tensor, memory_padding_mask: Tensor, self_attn_mask: Tensor | None = None) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                                            need_weights=False)[0]))
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


def token_centers(spatial_shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """(x, y) centre of every token of every level, normalized by its (padded) map size -> (S, 2)."""
    centers = []
    for h, w in spatial_shapes:
        ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h,
                                (torch.arange(w, device=device) + 0.5) / w, indexing="ij")
        centers.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(centers)


def token_level_ratios(spatial_shapes: list[tuple[int, int]], ratios: Tensor) -> Tensor:
    """(B, L, 2) valid ratios -> (B, S, 2): each token's own level's ratio."""
    # expand + cat, not repeat_interleave over a tensor of counts: a trace keeps h * w as graph values.
    return torch.cat([ratios[:, lvl, None].expand(-1, h * w, -1) for lvl, (h, w) in enumerate(spatial_shapes)], 1)


class QuerySelection(nn.Module):
    """Opt-in, not in the paper (``model.query_selection``): image-dependent reference points. Every encoder
    token is classified by its own head; the top-Q tokens' centres become the decoder queries' reference
    points and, through a sine encoding + MLP, their position embeddings; the content stays learned (DINO's
    "mixed" query selection). The paper's image-independent points are what make DETR-style training slow."""

    def __init__(self, dim: int, num_classes: int, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.output = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        self.pos_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, memory: Tensor, padding_mask: Tensor, positions: Tensor, num_queries: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        """memory (B, S, C), padding (B, S), token positions (B, S, 2) normalized to the valid region ->
        token class logits (B, S, classes), reference points (B, Q, 2) and query positions (B, Q, C)."""
        logits = self.class_embed(self.norm(self.output(memory)))
        score = logits.detach().amax(-1).masked_fill(padding_mask, float("-inf"))
        k = min(num_queries, score.shape[1])
        index = score.topk(k, dim=1).indices
        if k < num_queries:  # a map smaller than the query count: tokens are reused
            index = index.repeat(1, -(-num_queries // k))[:, :num_queries]
        reference = positions.gather(1, index[..., None].expand(-1, -1, 2)).clamp(0, 1)
        return logits, reference, self.pos_mlp(point_encoding(reference, memory.shape[-1]))


class DeformableTransformer(nn.Module):
    """Encodes P3..P6 with deformable self-attention; decodes learned queries with their reference points."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_queries, self.hybrid_queries = cfg.num_queries, cfg.hybrid_queries
        total = cfg.num_queries + cfg.hybrid_queries
        self.level_embed = nn.Parameter(torch.empty(cfg.num_levels, d))
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.point_refine = nn.ModuleList(_point_mlp(d) for _ in range(cfg.dec_layers)) if cfg.refine_points else None
        self.look_forward_twice = cfg.look_forward_twice
        if cfg.query_selection:
            self.query_selection = QuerySelection(d, cfg.num_classes)
            self.query_content = nn.Embedding(total, d)
        else:
            # The paper: each query a learned (position, content) pair; its reference point is predicted
            # from the position.
            self.query_selection = None
            self.query_embed = nn.Embedding(total, 2 * d)
            self.reference_points = nn.Linear(d, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official transformer's ``init_weights``: Xavier-uniform on every weight matrix of the encoder and
        decoder layers (FFN, self-attention, deformable attention's projections), then the deformable attentions'
        own initialisation, Xavier-uniform on the reference-point projection (bias 0) and a normal level
        embedding. The learned queries keep nn.Embedding's normal(0, 1): officially they belong to the head,
        outside the transformer. The opt-in modules (point refinement, query selection) keep their own init."""
        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if self.query_selection is None:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor],
                denoising: DenoisingQueries | None = None) -> dict[str, Tensor]:
        """``denoising``: training-only queries decoded after the learned ones (isda/models/denoising.py)."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        if exporting():  # the sizes are graph values in a trace; as_tensor would freeze them
            spatial_shapes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in shapes])
        else:
            spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=srcs[0].device)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)  # (B, L, 2)
        src = _flatten_levels(srcs)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        pos_embed = _flatten_levels([p + self.level_embed[i].view(1, -1, 1, 1) for i, p in enumerate(pos)])

        centers = token_centers(shapes, src.device)  # (S, 2) in padded-map coordinates
        positions = centers / token_level_ratios(shapes, ratios)  # (B, S, 2) in valid-region coordinates
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos_embed, positions[:, :, None] * ratios[:, None], spatial_shapes, mask)

        B = memory.shape[0]
        # Training-only one-to-many queries (H-DETR) follow the one-to-one queries; at inference they are not built.
        hybrid = self.hybrid_queries if self.training else 0
        total = self.num_queries + hybrid
        # The tokens' centres (padded-map and valid-region coordinates) and padding: what the token losses need.
        out = {"memory": memory, "spatial_shapes": spatial_shapes, "valid_ratios": ratios, "token_centers": centers,
               "token_positions": positions, "token_padding": mask}
        if self.query_selection is not None:
            out["enc_logits"], reference, query_pos = self.query_selection(memory, mask, positions, total)
            tgt = self.query_content.weight[:total].expand(B, -1, -1)
        else:
            query_pos, tgt = self.query_embed.weight[:total].split(memory.shape[-1], dim=1)
            query_pos, tgt = query_pos.expand(B, -1, -1), tgt.expand(B, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()  # (B, Q, 2), normalized to the valid region
        if denoising is not None:
            tgt, query_pos = torch.cat([tgt, denoising.content], 1), torch.cat([query_pos, denoising.position], 1)
            reference = torch.cat([reference, denoising.reference], 1)
        attn_mask = self_attention_mask(self.num_queries, hybrid, denoising, memory.device)
        hidden, points = [], []
        previous = reference  # look forward twice: the previous layer's point, with its gradient
        for i, layer in enumerate(self.decoder):
            tgt = layer(tgt, query_pos, reference[:, :, None] * ratios[:, None], memory, spatial_shapes, mask,
                        attn_mask)
            hidden.append(tgt)
            if self.point_refine is None:
                points.append(reference)
                continue
            delta = self.point_refine[i](tgt)
            point = (inverse_sigmoid(reference) + delta).sigmoid()
            # The same value; with DINO's look forward twice the gradient also reaches the previous layer's correction.
            points.append((inverse_sigmoid(previous) + delta).sigmoid() if self.look_forward_twice and self.training
                          else point)
            previous = point
            reference = point.detach()  # each layer's correction is learned from its own loss (Deformable DETR)
        # points: each layer's query points (its mask kernels' KP input); reference_points: the last layer's.
        return {**out, "hidden": torch.stack(hidden), "points": torch.stack(points), "reference_points": points[-1]}


def _point_mlp(dim: int) -> nn.Sequential:
    """Predicts a query's point correction in logit space; zero at initialisation (no correction)."""
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 2))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp

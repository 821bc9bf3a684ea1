"""Connectors between the vision tower and the LLM (SliME A2, Dense Connector B1-B2).

* DenseConnector: parameter-free fusion of tapped layers -> [M, P', Din]; ``mlp`` passes the base
  layer through, ``sti`` appends 1-D pooled tokens of the extra layers, ``sci`` concatenates extra
  layers along channels, ``dci`` concatenates group means along channels. Order is always [base, ...].
* MLPProjector: LLaVA-1.5 ``mlp2x_gelu`` (Din -> D -> D), the shared projector P of SliME.
* Resampler: perceiver-style cross-attention from learned queries (2-D sin-cos positions on queries and
  keys, LayerNorm eps 1e-6, no FFN, no residual). Used by the attention adapter and QueryCompressor.
* MixtureOfAdapters: per-token zero-initialised gate over {P(x), P(R(x))}; which path runs is chosen
  by ``forced_expert`` (never by the tensor's shape).

Shape legend: M tiles · P patches/tile · P' tokens after fusion · Din fused width · D LLM width ·
Q queries · L blocks run by the tower.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slime.config import ConnectorConfig, VisionConfig


def patch_positions(side: int) -> torch.Tensor:
    """(y, x) of every patch of a side x side grid in raster order -> [side*side, 2]."""
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32, device="cpu"),
                            torch.arange(side, dtype=torch.float32, device="cpu"),
                            indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=-1)


def query_positions(num_queries: int, key_side: int) -> torch.Tensor:
    """A sqrt(Q) x sqrt(Q) query grid laid over the key grid (cell centres, in key-patch units)."""
    q_side = math.isqrt(num_queries)
    scale = key_side / q_side
    return (patch_positions(q_side) + 0.5) * scale - 0.5


def sincos_table(side: int, dim: int) -> torch.Tensor:
    """The released code's fixed 2-D sin-cos table for a side x side grid in raster order -> [side*side, dim]:
    the first half encodes x (the column), the second y (the row), each as [sin | cos] over dim/4
    frequencies, computed in float32 numpy and stored as float16 exactly as upstream's ``pos_embed``
    (MODEL_SPEC A2/A3). Returned as float32 holding those float16 values."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = np.arange(dim // 4, dtype=np.float32)
    omega /= dim / 4.0
    omega = 1.0 / 10000**omega  # [dim/4]
    xs, ys = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))  # x first
    halves = []
    for coord in (xs, ys):
        angles = np.einsum("m,d->md", coord.reshape(-1), omega)  # [side*side, dim/4]
        halves += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(halves, axis=1)).to(torch.float16).float()


def float16_bits(table: torch.Tensor) -> torch.Tensor:
    """A table rounded to float16, kept as the bit patterns in int32 (see Resampler)."""
    return table.to(torch.float16).view(torch.int16).to(torch.int32)


def resize_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """A [g*g, C] grid table bicubically resized to side x side (align_corners=False), rounded back to the
    table's storage precision as upstream's ``get_abs_pos`` does (float16 when held in float32)."""
    g = math.isqrt(table.shape[0])
    store = torch.float16 if table.dtype == torch.float32 else table.dtype
    grid = table.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
    out = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(side * side, -1).to(store).to(table.dtype)


def pool_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """STI's 1-D average pooling over the raster sequence (not 2-D): [M, P, C] -> [M, floor(P/k), C]."""
    return F.avg_pool1d(x.transpose(1, 2), kernel_size=k, stride=k).transpose(1, 2)


class DenseConnector(nn.Module):
    """Parameter-free multi-layer fusion (MODEL_SPEC B2); the MLP projector is separate."""

    def __init__(self, cfg: ConnectorConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.base_index = vision.base_index
        self.num_layers = vision.num_layers
        self.side = vision.image_size // vision.patch_size
        num_states = vision.num_layers + 1
        if cfg.kind in ("sti", "sci"):
            bad = [i for i in cfg.extra_layers if not 0 <= i < num_states]
            if bad:
                raise ValueError(f"connector.extra_layers {list(cfg.extra_layers)}: {bad} outside the "
                                 f"tower's hidden_states 0..{num_states - 1}")
        if cfg.kind == "dci" and vision.num_layers % cfg.dci_groups:
            raise ValueError(f"connector.dci_groups {cfg.dci_groups} does not divide the tower's {vision.num_layers} blocks")
        width = vision.hidden_dim
        self.out_dim = {"mlp": width, "sti": width, "sci": width * (1 + len(cfg.extra_layers)),
                        "dci": width * (1 + cfg.dci_groups)}[cfg.kind]
        pos = patch_positions(self.side)
        if cfg.kind == "sti":  # pooled tokens sit at the mean position of the patches they average
            pooled = self._pool(pos[None])[0]
            pos = torch.cat([pos] + [pooled] * len(cfg.extra_layers))
        self.register_buffer("positions", pos, persistent=False)  # [P', 2]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def pooled(self) -> tuple[int, int]:
        """(pooled copies appended after the base tokens, pooling kernel): STI's extra token groups."""
        return (len(self.cfg.extra_layers) if self.cfg.kind == "sti" else 0), self.cfg.sti_pool

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(x, self.cfg.sti_pool)

    def forward(self, states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """L+1 hidden states [M, P, Dv] -> fused features [M, P', Din]."""
        base = states[self.base_index]
        kind = self.cfg.kind
        if kind == "mlp":
            return base
        if kind == "sti":
            return torch.cat([base] + [self._pool(states[i]) for i in self.cfg.extra_layers], dim=1)
        if kind == "sci":
            return torch.cat([base] + [states[i] for i in self.cfg.extra_layers], dim=-1)
        # dci: groups partition hidden_states[0 : L] (stem + blocks 1..L-1); CLIP-L: 0-11, 12-23.
        group = self.num_layers // self.cfg.dci_groups
        means = [torch.stack(states[g * group:(g + 1) * group]).mean(0) for g in range(self.cfg.dci_groups)]
        return torch.cat([base] + means, dim=-1)


class MLPProjector(nn.Module):
    """LLaVA-1.5 mlp2x_gelu; names match transformers' LlavaNextMultiModalProjector."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.linear_1, self.linear_2):
            lin.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def locality_bias(query_pos: torch.Tensor, key_pos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian prior on attention logits, -|p_q - p_k|^2 / (2 sigma^2): [Q, 2], [N, 2] -> [Q, N]."""
    return -torch.cdist(query_pos, key_pos).square() / (2 * sigma * sigma)


class Resampler(nn.Module):
    """Q learned queries cross-attend once to the tokens of each tile: [M, N, Din] -> [M, Q, Din].

    Positions follow the released code number for number: ``pos_embed`` is upstream's fixed sin-cos
    table over a g x g grid (g = sqrt(Q), or the key grid when ``queries_on_keys``); the queries add it
    directly and the keys add it bicubically resized to the key grid (12x12 -> 24x24 for the compressor).
    It is a saved buffer, so a released checkpoint's own table is what runs. Upstream keeps it a float16
    parameter whatever the model's dtype (a bf16 model still adds float16 positions), so it is stored as
    float16 bits in an int32 buffer: ``.to(dtype)`` never casts an integer tensor, the device moves it (int32,
    not int16: gloo and NCCL broadcast no int16, and DDP broadcasts buffers). STI's pooled key tokens
    (``pooled`` = (copies, kernel)) get the mean of the entries of the patches they average.
    ``queries_on_keys``: one query per key token, sharing its table entry (the global attention expert).

    ``locality`` (in query cells, None = off) adds a fixed Gaussian prior to the attention logits so
    each query starts on the keys of its own cell of the query grid (see slime/local.py for why the
    local compressor needs it); content logits still add to it, and it is a buffer, not a weight."""

    def __init__(self, num_queries: int, dim: int, num_heads: int, key_positions: torch.Tensor, *,
                 queries_on_keys: bool = False, pooled: tuple[int, int] = (0, 1),
                 locality: float | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not divisible by num_heads {num_heads}")
        self.key_side = int(key_positions[:, 1].max().item()) + 1
        self.queries_on_keys, self.pooled = queries_on_keys, pooled
        if not queries_on_keys and math.isqrt(num_queries) ** 2 != num_queries:
            raise ValueError(f"resampler queries {num_queries} do not form a square grid")
        grid = self.key_side if queries_on_keys else math.isqrt(num_queries)
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("pos_embed", float16_bits(sincos_table(grid, dim)))  # [g*g, Din] float16 bits
        bias = None
        if locality is not None:
            cell = self.key_side / math.isqrt(num_queries)  # query cell side in key patches
            bias = locality_bias(query_positions(num_queries, self.key_side), key_positions.float(), locality * cell)
        self.register_buffer("attn_bias", bias, persistent=False)  # [Q, N] or None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn._reset_parameters()
        for ln in (self.ln_q, self.ln_kv, self.ln_post):
            ln.reset_parameters()

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query table [Q, Din], key table [N, Din])."""
        table = self.pos_embed.to(torch.int16).view(torch.float16)
        patches = table if math.isqrt(table.shape[0]) == self.key_side else resize_table(table, self.key_side)
        copies, kernel = self.pooled
        pooled = pool_tokens(patches.float()[None], kernel)[0].to(patches.dtype) if copies else None
        keys = torch.cat([patches] + [pooled] * copies) if copies else patches
        return (keys if self.queries_on_keys else table), keys

    def _attend(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        query_pos, key_pos = self.tables()
        kv = self.ln_kv(x)  # [M, N, Din]
        q = (self.ln_q(self.query) + query_pos.to(x.dtype)).unsqueeze(0).expand(x.shape[0], -1, -1)
        bias = None if self.attn_bias is None else self.attn_bias.to(x.dtype)
        return self.attn(q, kv + key_pos.to(x.dtype), kv, attn_mask=bias, need_weights=need_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self._attend(x, need_weights=False)[0])  # [M, Q, Din]

    @torch.no_grad()
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention weights [M, Q, N] (for measuring locality)."""
        return self._attend(x, need_weights=True)[1]


class MixtureOfAdapters(nn.Module):
    """Global branch (MODEL_SPEC A2): out_i = g_i0 * P(x)_i + g_i1 * P(R(x))_i with a per-token gate.

    The shared projector P is passed in at call time so it is registered once, as ``projector``, on the
    model (phase prefixes stay unambiguous). Gate and noise weights start at zero -> 0.5 / 0.5.
    """

    def __init__(self, resampler: Resampler, in_dim: int, gate_noise: bool = True) -> None:
        super().__init__()
        self.resampler = resampler
        self.gate = nn.Linear(in_dim, 2, bias=False)
        self.noise = nn.Linear(in_dim, 2, bias=False)  # paper's W_noise (upstream reuses W_gate)
        self.gate_noise = gate_noise
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights [B, G, 2] (noisy in training)."""
        logits = self.gate(x).float()
        if self.training and self.gate_noise:
            scale = F.softplus(self.noise(x).float()) + 0.01
            logits = logits + torch.randn_like(logits) * scale
        probs = logits.softmax(dim=-1)
        # Upstream keeps the top k = 2 of 2 experts and renormalises with a 1e-6 guard: kept for parity.
        return (probs / (probs.sum(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)

    def forward(self, x: torch.Tensor, projector: nn.Module, forced_expert: int | None = None) -> torch.Tensor:
        """[B, G, Din] -> [B, G, D]."""
        if forced_expert == 0:
            return projector(x)
        if forced_expert == 1:
            return projector(self.resampler(x))
        if forced_expert is not None:
            raise ValueError(f"forced_expert must be 0 (MLP), 1 (attention) or None, got {forced_expert}")
        g = self.gates(x)
        return g[..., :1] * projector(x) + g[..., 1:] * projector(self.resampler(x))

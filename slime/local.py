"""Local branch (SliME A3): QueryCompressor per crop, raster re-layout, TextGuidedSelector.

QueryCompressor: Q learned queries (default 144 = 12x12) cross-attend to each crop's tokens, then the
shared projector P maps them to the LLM width. ``raster_layout`` re-orders the crops' query grids so
the tokens read row by row across the whole (rows*q) x (cols*q) map.

Locality (``LocalConfig.compressor``). Upstream's compressor adds sin-cos positions to queries and keys,
but the random in-projections of a fresh attention layer erase that geometry: at init every query
attends to nearly every key (measured on an 8x8 crop with 16 queries: 61 effective keys of 64, i.e. a
mean-pool; a one-patch detail read from the compressed token is at chance, 0.29 for 4 classes). So
the default ``local`` adds a fixed Gaussian prior -d^2 / (2 sigma^2) to the attention logits, d the
distance between a query's cell centre and a key patch, sigma = LOCALITY (0.25) query cells: each query
starts on its own cell (>0.8 of its attention, 4.5 effective keys), the detail probe reads 0.78, and
content logits can still move it. ``upstream`` is the released form (needed to reproduce released
weights; the real presets use it). Tests: tests/test_local.py (locality, detail probe).

TextGuidedSelector: cosine relevance of each local token to the *instruction* tokens' input embeddings
(never the answer: upstream leaked answers into this score in training), computed by normalised matmul
in fp32 (no [L, T, D] broadcast), Gaussian noise in training, then either keep ceil(gamma * L) top tokens
(default) or the upstream nucleus rule; kept tokens stay in original order. Selection is a hard
gather: no gradient reaches the scores.

Score and noise (``LocalConfig.score`` / ``noise``). Upstream *sums* the cosines over the T text tokens
(the paper says average) and adds sigma = 0.1 noise, a scale set for sums. Averaging and keeping the
absolute 0.1 makes the noise 5-17x the spread of untrained scores (std 0.019 on benchmarks/miniature's
model, 0.006 on the model issue 10 measured), so training-time top-k keeps near-random tokens.
Default: the paper's mean, with noise relative to the spread of this sample's scores, sigma =
noise_std * std(s): the same ranking perturbation whatever the score scale (sum = T * mean gives
identical selections). In tests/test_local.py, 8 planted tokens
lifted 2.5 spreads above 88 others survive training-mode selection at gamma 0.5 100 % of the time
with the default and with upstream's sum + absolute noise, but 64 % with mean + absolute noise
(chance 50 %). Every combination stays selectable.

No instruction tokens (the ``plain`` template, a caption prompt, ``text: instruction`` with an empty
question): there is nothing to rank against, so the selector keeps K evenly spaced tokens
(``linspace(0, L-1, K)`` rounded), deterministically and the same in training and at inference. Ranking
would not be a choice: every score is 0, relative noise is 0.1 x std(0) = 0 and ``topk`` over ties keeps
an arbitrary set (absolute noise: a random one), so training would see other tokens than evaluation.
Nucleus keeps every slot in that case (K = L).

Shape legend: n crops · P' tokens/crop · Din fused width · Q queries/crop · q = sqrt(Q) · D LLM width ·
L = n*Q local tokens · T instruction tokens · K kept tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slime.config import LocalConfig
from slime.connectors import Resampler
from slime.tiling import kept_count

# Width of the local compressor's locality prior, in query cells (LocalConfig.compressor = "local").
LOCALITY = 0.25


class QueryCompressor(nn.Module):
    def __init__(self, resampler: Resampler) -> None:
        super().__init__()
        self.resampler = resampler

    def forward(self, crops: torch.Tensor, projector: nn.Module) -> torch.Tensor:
        """[n, P', Din] -> [n, Q, D]."""
        return projector(self.resampler(crops))


def raster_layout(tokens: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """[n, Q, D] crops in row-major order -> [n*Q, D] in raster order over the whole token map."""
    n, num_q, dim = tokens.shape
    if n != cols * rows:
        raise ValueError(f"{n} crops do not fill a {cols}x{rows} grid")
    q = math.isqrt(num_q)
    grid = tokens.view(rows, cols, q, q, dim).permute(0, 2, 1, 3, 4)  # [rows, q, cols, q, D]
    return grid.reshape(rows * q * cols * q, dim)


class TextGuidedSelector(nn.Module):
    """No parameters. Returns kept tokens and a validity mask (all True except unused nucleus slots)."""

    def __init__(self, cfg: LocalConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each local token to the instruction tokens, averaged (paper) or summed
        (upstream) over them: [L, D], [T, D] -> [L] fp32."""
        if text.shape[0] == 0:
            return torch.zeros(tokens.shape[0], device=tokens.device)
        v = nn.functional.normalize(tokens.float(), dim=-1)
        t = nn.functional.normalize(text.float(), dim=-1)
        cos = v @ t.T  # [L, T]
        return cos.sum(dim=-1) if self.cfg.score == "sum" else cos.mean(dim=-1)

    def noisy(self, s: torch.Tensor) -> torch.Tensor:
        """Training-time Gaussian noise on the scores [L]: sigma = noise_std (absolute, upstream) or
        noise_std * std(s) over this sample's tokens (relative, default: the same ranking perturbation
        whatever the scale of the scores)."""
        if not self.training or self.cfg.noise_std == 0 or s.numel() < 2:
            return s
        sigma = self.cfg.noise_std * (s.std() if self.cfg.noise == "relative" else 1.0)
        return s + sigma * torch.randn_like(s)

    @torch.no_grad()
    def select(self, tokens: torch.Tensor, text: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Which local tokens to keep: indices [K] into ``tokens`` in original order and a validity mask [K]
        (K = kept_count(L, gamma); unused nucleus slots point at index 0 and are invalid)."""
        num_local = tokens.shape[0]
        k = kept_count(num_local, gamma, self.cfg.selection)
        ones = torch.ones(k, dtype=torch.bool, device=tokens.device)
        if text.shape[0] == 0:
            # Nothing to rank against: evenly spaced tokens, in training as at inference (module docstring).
            return torch.linspace(0, num_local - 1, k, device=tokens.device).round().long(), ones
        s = self.noisy(self.scores(tokens, text))
        if self.cfg.selection == "topk":
            return s.topk(k).indices.sort().values, ones
        # Upstream nucleus: keep tokens whose cumulative probability is <= gamma, plus one more.
        p = (s / self.cfg.temperature).softmax(dim=-1)
        order = p.argsort(descending=True)
        keep = int((p[order].cumsum(0) <= gamma).sum().item()) + 1
        idx = order[: min(keep, num_local)].sort().values
        out = torch.zeros(k, dtype=torch.long, device=tokens.device)
        out[: idx.numel()] = idx
        valid = torch.zeros(k, dtype=torch.bool, device=tokens.device)
        valid[: idx.numel()] = True
        return out, valid

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, D], [T, D] -> kept [K, D] in original order and valid mask [K] (K = kept_count(L, gamma))."""
        idx, valid = self.select(tokens, text, gamma)
        return tokens[idx] * valid[:, None].to(tokens.dtype), valid

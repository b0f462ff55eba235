"""Semantic IDs: a residual-quantized autoencoder (RQ-VAE) over the frozen item embeddings.

An item's embedding x is encoded to a latent z; level 1 picks the nearest code of codebook 1,
level 2 quantizes the residual z - e1 with codebook 2, and so on. The tuple (c1, .., cL) is the
item's semantic ID: items that share a prefix are close in the encoder space, which is what lets
a generator over IDs move from coarse to fine. Items that share all L codes get a suffix (their
rank by item id within the group) so that a full ID names exactly one item.

Training is full-batch (a catalog of a few thousand items fits): autoencoder warm-up, then each
codebook is initialised by k-means on its level's residuals, then joint training with the
straight-through estimator and a commitment loss. Codes nobody uses are re-seeded from random
residuals every few steps (dead codes would shrink the vocabulary for nothing).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gpl_platform.anchor_settings import SemanticIdConfig
from gpl_platform.engine.threads import torch_threads

log = logging.getLogger(__name__)
_REVIVE_EVERY = 50


@contextmanager
def deterministic_torch() -> Iterator[None]:
    """Deterministic kernels while training: the backward pass of a gather (codebook lookup, token
    embedding) accumulates in parallel on CPU, in an order that changes from one process to the next,
    and the argmin of the quantizer turns such last-bit differences into other codes."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def auto_codebook_size(n_items: int, levels: int) -> int:
    """The power of two nearest to 2 * n^(1/L), at least 4: enough codes that most items get an ID
    of their own without a suffix, few enough that each code is shared (and learnable)."""
    target = 2.0 * max(n_items, 1) ** (1.0 / levels)
    return int(max(4, 2 ** round(math.log2(target))))


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, latent_dim: int, hidden_dim: int, levels: int, codebook_size: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, in_dim))
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, latent_dim) * 0.1)

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(codes (n, L), quantized latent (n, d), codebook loss, residual entering each level)."""
        residual, quantized = z, torch.zeros_like(z)
        codes, residuals, loss = [], [], z.new_zeros(())
        for level in range(self.levels):
            book = self.codebooks[level]
            residuals.append(residual)
            dist = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(1)[None]
            idx = dist.argmin(1)
            chosen = book[idx]
            loss = loss + F.mse_loss(chosen, residual.detach())
            codes.append(idx)
            quantized = quantized + chosen
            residual = residual - chosen.detach()
        return torch.stack(codes, 1), quantized, loss, residuals


@dataclass
class SemanticIdFit:
    """The result of :func:`fit_semantic_ids`: codes of every item (L levels + suffix) and metrics."""

    item_ids: list[str]
    codes: np.ndarray  # (n, L + 1) int64; the last column is the collision suffix
    decoded: np.ndarray  # (n, dim) float32, L2-normalized RQ-VAE reconstruction of each item's L codes
    codebook_size: int
    metrics: dict
    version: str
    state_dict: dict = field(repr=False, default_factory=dict)


def semantic_id_version(encoder_id: str, item_ids, vectors: np.ndarray, cfg: SemanticIdConfig, seed: int) -> str:
    digest = hashlib.sha256()
    digest.update(encoder_id.encode())
    digest.update(cfg.model_dump_json().encode())
    digest.update(str(seed).encode())
    digest.update("\x1f".join(map(str, item_ids)).encode())
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return "sid-" + digest.hexdigest()[:12]


def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Plain Lloyd's k-means with k-means++ seeding (deterministic under ``generator``)."""
    n = points.shape[0]
    centers = [points[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(points, torch.stack(centers)).pow(2).min(1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        centers.append(points[torch.multinomial(probs, 1, generator=generator)].squeeze(0))
    centers_t = torch.stack(centers)
    for _ in range(iters):
        assign = torch.cdist(points, centers_t).argmin(1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centers_t[j] = members.mean(0)
    return centers_t


def assign_suffixes(item_ids: list[str], prefix_codes: np.ndarray) -> np.ndarray:
    """Suffix = rank of the item (by id) among the items sharing its L codes; 0 when it has them alone."""
    order = np.lexsort((np.asarray(item_ids, dtype=object).astype(str), *prefix_codes.T[::-1]))
    suffix = np.zeros(len(item_ids), dtype=np.int64)
    previous, run = None, 0
    for pos in order:
        key = tuple(prefix_codes[pos])
        run = run + 1 if key == previous else 0
        suffix[pos], previous = run, key
    return suffix


def fit_semantic_ids(
    item_ids, vectors: np.ndarray, cfg: SemanticIdConfig, seed: int, encoder_id: str, progress: bool = False
) -> SemanticIdFit:
    """Train the RQ-VAE on ``vectors`` (one row per item id) and return collision-free IDs."""
    with deterministic_torch(), torch_threads(cfg.torch_threads):
        return _fit_semantic_ids(item_ids, vectors, cfg, seed, encoder_id, progress)


def _fit_semantic_ids(
    item_ids, vectors: np.ndarray, cfg: SemanticIdConfig, seed: int, encoder_id: str, progress: bool
) -> SemanticIdFit:
    item_ids = [str(i) for i in item_ids]
    x_np = np.asarray(vectors, dtype=np.float32)
    if x_np.ndim != 2 or len(x_np) != len(item_ids):
        raise ValueError(f"vectors must be (n_items={len(item_ids)}, dim), got {x_np.shape}")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item ids must be unique")
    if len(item_ids) < 2:
        raise ValueError(f"semantic IDs need at least 2 items, got {len(item_ids)}")
    if not np.isfinite(x_np).all():
        raise ValueError("item vectors contain NaN or inf")
    size = cfg.codebook_size or auto_codebook_size(len(item_ids), cfg.levels)
    version = semantic_id_version(encoder_id, item_ids, x_np, cfg, seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(x_np.copy())
    model = RQVAE(x.shape[1], cfg.latent_dim, cfg.hidden_dim, cfg.levels, size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.warmup_epochs + cfg.epochs, desc="RQ-VAE", disable=not progress)
    for _ in range(cfg.warmup_epochs):  # the latent space first, so k-means has structure to find
        opt.zero_grad()
        F.mse_loss(model.decoder(model.encoder(x)), x, reduction="none").sum(1).mean().backward()
        opt.step()
        bar.update()
    with torch.no_grad():
        residual = model.encoder(x)
        for level in range(cfg.levels):
            centers = _kmeans(residual, min(size, len(x)), gen)
            model.codebooks[level, : len(centers)] = centers
            residual = residual - centers[torch.cdist(residual, centers).argmin(1)]
    for step in range(cfg.epochs):
        opt.zero_grad()
        z = model.encoder(x)
        codes, quantized, codebook_loss, _ = model.quantize(z)
        commit = F.mse_loss(z, quantized.detach())
        x_hat = model.decoder(z + (quantized - z).detach())  # straight-through
        recon = F.mse_loss(x_hat, x, reduction="none").sum(1).mean()
        (recon + codebook_loss + cfg.commitment_beta * commit).backward()
        opt.step()
        bar.update()
        if (step + 1) % _REVIVE_EVERY == 0 and step + 1 < cfg.epochs:
            _revive_dead_codes(model, x, gen)
    bar.close()

    model.eval()
    with torch.no_grad():
        z = model.encoder(x)
        codes_t, quantized, _, _ = model.quantize(z)
        x_hat = model.decoder(quantized)
    prefix = codes_t.numpy().astype(np.int64)
    suffix = assign_suffixes(item_ids, prefix)
    decoded = F.normalize(x_hat, dim=1).numpy().astype(np.float32)
    metrics = _metrics(x_np, x_hat.numpy(), prefix, suffix, size)
    log.info(
        "semantic IDs %s: %d items, %d levels x %d codes, recon rel err %.3f, cosine %.3f, collisions %.3f",
        version,
        len(item_ids),
        cfg.levels,
        size,
        metrics["reconstruction_relative_error"],
        metrics["reconstruction_cosine"],
        metrics["collision_share"],
    )
    return SemanticIdFit(
        item_ids,
        np.column_stack([prefix, suffix]),
        decoded,
        size,
        metrics,
        version,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _revive_dead_codes(model: RQVAE, x: torch.Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        codes, _, _, residuals = model.quantize(model.encoder(x))
        for level in range(model.levels):
            used = torch.bincount(codes[:, level], minlength=model.codebooks.shape[1]) > 0
            dead = torch.nonzero(~used).flatten()
            if len(dead):
                pick = torch.randint(len(x), (len(dead),), generator=gen)
                model.codebooks[level, dead] = residuals[level][pick]


def _metrics(x: np.ndarray, x_hat: np.ndarray, prefix: np.ndarray, suffix: np.ndarray, size: int) -> dict:
    err = ((x - x_hat) ** 2).sum(1)
    cos = (x * x_hat).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1) + 1e-12)
    usage, perplexity = [], []
    for level in range(prefix.shape[1]):
        counts = np.bincount(prefix[:, level], minlength=size)
        p = counts[counts > 0] / counts.sum()
        usage.append(float((counts > 0).mean()))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
    _, group_sizes = np.unique(prefix, axis=0, return_counts=True)
    full = np.column_stack([prefix, suffix])
    return {
        "n_items": int(len(x)),
        "levels": int(prefix.shape[1]),
        "codebook_size": int(size),
        "reconstruction_mse": float(err.mean()),
        "reconstruction_relative_error": float(err.mean() / ((x**2).sum(1).mean() + 1e-12)),
        "reconstruction_cosine": float(cos.mean()),
        "codebook_usage": usage,
        "codebook_perplexity": perplexity,
        "distinct_prefixes": int(len(group_sizes)),
        "collision_share": float((group_sizes[group_sizes > 1]).sum() / len(x)),
        "max_items_per_prefix": int(group_sizes.max()),
        "suffix_vocabulary": int(suffix.max() + 1),
        "unique_ids": int(len(np.unique(full, axis=0))),
    }

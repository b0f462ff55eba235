"""Semantic IDs for the ``sid`` anchor backend (docs/SEMANTIC_IDS.md): RQ-VAE item codes (``rqvae``), the
ID-sequence generator and its prefix-constrained beam search (``generator``), warehouse storage (``store``)."""

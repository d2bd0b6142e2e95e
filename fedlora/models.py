"""Load a frozen pretrained base once per process and give each client a LoRA adapter on it.

The base model is the expensive part (tens of millions of parameters); an adapter is a few
hundred kilobytes. :func:`get_lora_model` therefore caches one PEFT model per process
(keyed by model, task and label count) and holds one named PEFT adapter per LoRA rank on it,
so simulating many clients (or many rounds) swaps adapter tensors, never models.

Adapter initialisation is seeded per tensor name (:func:`init_adapter_state`), so the
server and every client derive bit-identical initial adapters from the run's seed without
sending them -- FFA-LoRA's frozen, shared ``A`` relies on this.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from fedlora.adapters import AdapterState, is_lora_a, is_lora_b, split_state
from fedlora.modelstore import PACKAGED_MODEL, ModelError, resolve_model_path

log = logging.getLogger(__name__)

# Attention projections adapted by default, by Hugging Face ``model_type``.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
}

# Classification heads trained (and sent) alongside the adapter, by ``model_type``.
HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "distilbert": ("pre_classifier", "classifier"),
    "gpt2": ("score",),
    "llama": ("score",),
    "mistral": ("score",),
    "qwen2": ("score",),
}


def detect_target_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """Return the LoRA target modules for ``model``'s architecture.

    Raises
    ------
    ModelError
        If the architecture is unknown and no known projection names are present.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in TARGET_MODULES:
        return TARGET_MODULES[model_type]
    leaf_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for candidates in TARGET_MODULES.values():
        if set(candidates) <= leaf_names:
            return candidates
    raise ModelError(
        f"cannot detect LoRA target modules for model type {model_type!r}; "
        f"set lora.target_modules to some of its linear layers, e.g. {sorted(leaf_names)[:6]}"
    )


@dataclass
class LoadedModel:
    """A PEFT-wrapped base model, its tokenizer, and the adapters created on it so far."""

    peft: PeftModel
    tokenizer: object
    task: str
    target_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    adapters: dict[int, str]


_CACHE: dict[tuple[str, str, int, tuple[str, ...], str], LoadedModel] = {}


def _load_base(
    path: str, task: str, num_labels: int, quantization: str = "none", device: str = "auto"
) -> tuple[PreTrainedModel, object]:
    from fedlora.quantize import prepare_quantized, quantization_config
    from fedlora.train import resolve_device

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs: dict[str, object] = {}
    if quantization != "none":
        dev = resolve_device(device)
        # A quantised model is placed on its device while loading; it is never moved later.
        kwargs = {"quantization_config": quantization_config(quantization, dev), "device_map": {"": dev}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError(
            f"cannot load model {path!r}: {err}. Use 'minilm' (packaged), 'smollm2' (optional package), "
            "a local model directory, a .gguf file, or a hub id while online"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization != "none":
        model = prepare_quantized(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def adapter_name(rank: int) -> str:
    """Return the PEFT adapter name used for rank ``rank``."""
    return f"r{rank}"


def get_lora_model(
    name: str,
    task: str,
    num_labels: int,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = (),
    base: PreTrainedModel | None = None,
    tokenizer: object | None = None,
    quantization: str = "none",
    device: str = "auto",
) -> LoadedModel:
    """Return the process-wide PEFT model for ``name`` with an active adapter of rank ``rank``.

    The base model is loaded once per (model, task, labels, targets); adapters of other
    ranks are added to the same model on first use. ``base``/``tokenizer`` let callers
    supply an in-memory model (tests build tiny random models this way). ``quantization``
    (``"4bit"``/``"8bit"``, see :mod:`fedlora.quantize`) loads the frozen base quantised,
    directly onto ``device``.
    """
    base_key = name if base is None else f"in-memory:{id(base)}"
    key = (base_key, task, num_labels, tuple(target_modules), quantization)
    loaded = _CACHE.get(key)
    if loaded is None:
        if base is None:
            path = resolve_model_path(name)
            base, tokenizer = _load_base(path, task, num_labels, quantization, device)
        targets = tuple(target_modules) or detect_target_modules(base)
        model_type = getattr(base.config, "model_type", "")
        heads = HEAD_MODULES.get(model_type, ("classifier",)) if task == "classification" else ()
        peft_cfg = _lora_config(rank, alpha, dropout, targets, heads, task)
        peft_model = get_peft_model(base, peft_cfg, adapter_name=adapter_name(rank))
        loaded = LoadedModel(peft_model, tokenizer, task, targets, heads, {rank: adapter_name(rank)})
        _CACHE[key] = loaded
        log.info("loaded base model %s (%s) with LoRA targets %s", name, task, targets)
    elif rank not in loaded.adapters:
        cfg = _lora_config(rank, alpha, dropout, loaded.target_modules, loaded.head_modules, task)
        loaded.peft.add_adapter(adapter_name(rank), cfg)
        loaded.adapters[rank] = adapter_name(rank)
    loaded.peft.set_adapter(adapter_name(rank))
    _set_scale(loaded.peft, adapter_name(rank), alpha / rank)
    return loaded


def _lora_config(
    rank: int, alpha: float, dropout: float, targets: Sequence[str], heads: Sequence[str], task: str
) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        modules_to_save=list(heads) or None,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )


def _set_scale(model: PeftModel, name: str, scale: float) -> None:
    """Set the LoRA scaling of adapter ``name`` (a client's alpha may differ from the first one's)."""
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and name in scaling:
            scaling[name] = scale


def adapter_state(loaded: LoadedModel, rank: int) -> AdapterState:
    """Return a detached copy of the rank-``rank`` adapter's tensors, PEFT-named (float32, CPU)."""
    sd = get_peft_model_state_dict(loaded.peft, adapter_name=adapter_name(rank))
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def load_adapter_state(loaded: LoadedModel, rank: int, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (PEFT-named, any subset of the adapter's tensors) into the rank-``rank`` adapter.

    Raises
    ------
    ModelError
        If a tensor name is unknown or its shape does not match the adapter.
    """
    current = get_peft_model_state_dict(loaded.peft, adapter_name=adapter_name(rank))
    for k, v in state.items():
        if k not in current:
            raise ModelError(f"adapter tensor {k!r} is not part of this model's rank-{rank} adapter")
        if tuple(current[k].shape) != tuple(v.shape):
            raise ModelError(
                f"adapter tensor {k!r} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(current[k].shape)}"
            )
    merged = {k: state.get(k, current[k]) for k in current}
    result = set_peft_model_state_dict(loaded.peft, merged, adapter_name=adapter_name(rank))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter tensors were not loaded: {unexpected[:3]}")


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def init_adapter_state(template: Mapping[str, torch.Tensor], seed: int) -> AdapterState:
    """Return a freshly initialised adapter with the shapes of ``template``, seeded per tensor name.

    LoRA ``A`` (r x d_in) ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) -- PEFT's Kaiming-uniform(a=sqrt(5))
    default -- and ``B`` = 0, so the adapter starts as a no-op. Head weights ~ N(0, 0.02),
    head biases 0 (BERT's initialiser). The same (seed, name) gives the same tensor on
    every machine, independent of creation order.
    """
    out: AdapterState = {}
    for name, t in template.items():
        g = torch.Generator().manual_seed(_seed_for(seed, name))
        if is_lora_b(name) or (not is_lora_a(name) and t.dim() == 1):
            out[name] = torch.zeros(t.shape, dtype=torch.float32)
        elif is_lora_a(name):
            bound = 1.0 / math.sqrt(t.shape[1])
            out[name] = (torch.rand(t.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound
        else:
            out[name] = torch.randn(t.shape, generator=g, dtype=torch.float32) * 0.02
    return out


def set_trainable(loaded: LoadedModel, rank: int, train_a: bool) -> list[str]:
    """Make exactly the rank-``rank`` adapter's tensors trainable (A only when ``train_a``).

    Returns the PEFT (saved-form) names of the trainable tensors.
    """
    name = adapter_name(rank)
    for p in loaded.peft.parameters():
        p.requires_grad_(False)
    trainable = []
    for pname, p in loaded.peft.named_parameters():
        if f".{name}." not in pname and not pname.endswith(f".{name}"):
            continue
        if ".lora_A." in pname and not train_a:
            continue
        p.requires_grad_(True)
        trainable.append(pname)
    return trainable


def trained_keys(state_keys: Sequence[str], train_a: bool) -> list[str]:
    """Return the saved-form names a client trains and sends: all, or all but the A factors."""
    return [k for k in state_keys if train_a or not is_lora_a(k)]


@contextlib.contextmanager
def merged_into_base(loaded: LoadedModel, merge: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily add a factored update ``B @ A`` (scale folded into A) to the base weights.

    Used by FLoRA, whose aggregated update lives in the base model. The cached base is
    shared by every client of the process, so the original weights are restored on exit.
    """
    if not merge:
        yield
        return
    pairs, _ = split_state(merge)
    layers = _lora_layers(loaded.peft)
    saved: dict[str, torch.Tensor] = {}
    try:
        for module, pair in pairs.items():
            layer = layers.get(_strip_prefix(module))
            if layer is None:
                raise ModelError(f"merge update names module {module!r}, which this model does not adapt")
            weight = layer.get_base_layer().weight
            if not weight.dtype.is_floating_point:
                raise ModelError(
                    f"cannot merge an update into the quantised base weight of {module!r}; strategies "
                    "that merge into the base (FLoRA) need model.quantization = 'none'"
                )
            dense = (pair.b.double() @ pair.a.double()).to(weight.dtype)
            if getattr(layer, "fan_in_fan_out", False):
                dense = dense.T
            if dense.shape != weight.shape:
                raise ModelError(
                    f"merge update for {module!r} has shape {tuple(dense.shape)}, "
                    f"base weight {tuple(weight.shape)}"
                )
            saved[module] = weight.data.clone()
            weight.data += dense.to(weight.device)
        yield
    finally:
        for module, original in saved.items():
            layers[_strip_prefix(module)].get_base_layer().weight.data.copy_(original)


def _strip_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _lora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {_strip_prefix(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


__all__ = [
    "PACKAGED_MODEL",
    "LoadedModel",
    "ModelError",
    "adapter_state",
    "detect_target_modules",
    "get_lora_model",
    "init_adapter_state",
    "load_adapter_state",
    "merged_into_base",
    "resolve_model_path",
    "set_trainable",
    "trained_keys",
]

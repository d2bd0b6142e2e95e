"""A 4-bit or 8-bit frozen base model through bitsandbytes (QLoRA).

QLoRA: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs".

Only the frozen base is quantised: NF4 (4-bit NormalFloat, double quantisation) or LLM.int8()
weights; the LoRA factors and any classification head stay in float32 and are the only
trainable (and, under DP, the only private) parameters. Layer norms are upcast to float32 by
PEFT's ``prepare_model_for_kbit_training``.

bitsandbytes is an optional extra (:data:`BNB_INSTALL`). Its 0.50 release runs 4-bit and
8-bit layers on CPU as well as CUDA, so the QLoRA path is tested on CPU; the memory saving
is what matters on an edge GPU (see ``docs/llm.md``). Apple MPS is refused.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from fedlora.modelstore import ModelError

BNB_INSTALL = "pip install --no-deps bitsandbytes==0.50.2"


def bnb_available() -> bool:
    """Return whether bitsandbytes is installed (located, not imported)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_config(mode: str, device: torch.device) -> Any | None:
    """Return the ``BitsAndBytesConfig`` for ``mode`` (``"none"`` gives None).

    Raises
    ------
    ModelError
        If bitsandbytes is missing (the message gives the install command), the device is
        MPS, or ``mode`` is unknown.
    """
    if mode == "none":
        return None
    if mode not in ("4bit", "8bit"):
        raise ModelError(f"model.quantization = {mode!r}: expected 'none', '4bit' or '8bit'")
    if device.type == "mps":
        raise ModelError(
            f"model.quantization = {mode!r} needs bitsandbytes on CUDA or CPU; Apple MPS is not "
            "supported: set model.quantization = 'none' or train.device = 'cpu'"
        )
    if not bnb_available():
        raise ModelError(
            f"model.quantization = {mode!r} needs the optional bitsandbytes package; install it with: "
            f"{BNB_INSTALL} (or set model.quantization = 'none')"
        )
    from transformers import BitsAndBytesConfig

    compute = torch.float32
    if device.type == "cuda":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_quantized(model: Any) -> Any:
    """Make a freshly loaded quantised model trainable with LoRA (PEFT's k-bit preparation).

    Freezes every base parameter, upcasts the remaining floating-point ones (norms,
    embeddings) to float32 and lets inputs require grad, without turning on gradient
    checkpointing (``train.gradient_checkpointing`` decides that).
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def is_quantized(model: torch.nn.Module) -> bool:
    """Return whether ``model`` holds bitsandbytes 4-bit or 8-bit layers."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())

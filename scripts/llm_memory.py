"""Estimated peak GPU memory of one fedlora client fine-tuning LoRA on a 135M, 1B and 7B model.

These are computed, not measured (``docs/llm.md`` says so): an arithmetic model of what a
training step holds, printed as the Markdown table in ``docs/llm.md``::

    python scripts/llm_memory.py

Terms (bytes):

* frozen base weights: bf16 = 2 per parameter; 4-bit NF4 with double quantisation (QLoRA)
  = 4.127 bits per parameter of the decoder's linear layers, embeddings and an untied output
  layer stay bf16; fp32 = 4 (what a GGUF-converted SmolLM2 loads as);
* LoRA on q_proj and v_proj: fp32 weight + gradient + two AdamW moments = 16 per parameter;
  under DP also one fp32 per-sample gradient per example of the batch (Opacus);
* activations kept for the backward pass, bf16: 34 x hidden per token and layer (Korthikanti
  et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", without the
  attention-score term, which SDPA/flash attention does not store; an upper bound for LoRA,
  whose frozen weights need fewer saved inputs); with gradient checkpointing only each
  layer's bf16 input (2 x hidden) plus one layer's full activations during recomputation;
* logits for the loss: bf16 logits + fp32 copy + fp32 gradient = 10 per token and vocabulary
  entry (fedlora computes each example's loss in fp32);
* 0.5 GiB for the CUDA context and allocator slack.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """The architecture facts the estimate needs (from each model's config.json)."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_dim: int  # key/value heads x head dimension (GQA)
    vocab: int
    tied: bool


MODELS = (
    Arch("SmolLM2-135M", 134.5e6, 30, 576, 192, 49152, True),
    Arch("Llama-3.2-1B", 1.236e9, 16, 2048, 512, 128256, True),
    Arch("Mistral-7B", 7.242e9, 32, 4096, 1024, 32000, False),
)


def weights(a: Arch, quant: str) -> float:
    """Bytes of the frozen base."""
    embed = a.vocab * a.hidden * (1 if a.tied else 2)
    if quant == "4bit":
        return (a.params - embed) * 4.127 / 8 + embed * 2
    return a.params * (4 if quant == "fp32" else 2)


def lora_params(a: Arch, rank: int) -> float:
    """LoRA parameters on q_proj (hidden -> hidden) and v_proj (hidden -> kv_dim) of every layer."""
    return a.layers * rank * ((a.hidden + a.hidden) + (a.hidden + a.kv_dim))


def peak(a: Arch, quant: str, ckpt: bool, dp: bool, batch: int, seq: int, rank: int = 16) -> float:
    """Estimated peak bytes of one training step."""
    tokens = batch * seq
    per_layer = 34 * a.hidden * tokens
    acts = (a.layers * 2 * a.hidden * tokens + per_layer) if ckpt else a.layers * per_layer
    logits = 10 * tokens * a.vocab
    lora = lora_params(a, rank) * (16 + (4 * batch if dp else 0))
    return weights(a, quant) + lora + acts + logits + 0.5 * GIB


def table(batch: int = 4, seq: int = 512) -> str:
    """Return the Markdown table of ``docs/llm.md``."""
    cols = [
        ("bf16", "bf16", False, False),
        ("bf16 + ckpt", "bf16", True, False),
        ("4-bit", "4bit", False, False),
        ("4-bit + ckpt", "4bit", True, False),
        ("4-bit + ckpt + DP", "4bit", True, True),
    ]
    head = "| model | " + " | ".join(c[0] for c in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]
    for a in MODELS:
        cells = [f"{peak(a, q, ck, dp, batch, seq) / GIB:.1f} GiB" for _, q, ck, dp in cols]
        rows.append(f"| {a.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print("batch 4 x 512 tokens, LoRA rank 16 on q_proj/v_proj (computed, not measured):\n")
    print(table())
    print("\nbatch 16 x 56 tokens (simulations/instruct.toml sizes), fp32 SmolLM2 as fedlora loads it:")
    a = MODELS[0]
    plain, dp = peak(a, "fp32", False, False, 16, 56), peak(a, "fp32", False, True, 16, 56)
    print(f"  {plain / GIB:.2f} GiB, with DP {dp / GIB:.2f} GiB")

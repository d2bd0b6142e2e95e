"""Training throughput and peak memory of one LoRA client on SmolLM2-135M-Instruct (one variant).

Called by ``scripts/gpu_check.sh`` once per variant, each in a fresh process so peak memory
is the variant's own:

* ``plain``: single-node PEFT the usual way (``model(..., labels=...).loss``, AdamW, bf16
  autocast on CUDA), the reference;
* ``fedlora``: fedlora's client training loop (``fedlora.train.train_local``) on the same
  data, model, LoRA shape, batch size and steps;
* ``fedlora-dp``: the same under record-level DP-SGD (Opacus, Poisson sampling, σ = 1);
* ``fedlora-4bit`` / ``fedlora-4bit-dp``: with an NF4-quantised frozen base (QLoRA).

Prints one JSON line: variant, device, tokens/s (response and prompt tokens that are not
padding, after two warm-up steps), peak accelerator memory in MiB (CUDA only) and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace

import torch

from fedlora.config import TrainConfig
from fedlora.data.encode import encode
from fedlora.data.instruct import instruct_splits
from fedlora.modelstore import resolve_model_path

VARIANTS = ("plain", "fedlora", "fedlora-dp", "fedlora-4bit", "fedlora-4bit-dp")
RANK, ALPHA, MAX_LEN = 8, 16.0, 56


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _plain(ds: torch.utils.data.TensorDataset, cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """Train plain PEFT for ``steps`` (after 2 warm-up steps); return the timed seconds."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2")).to(device)
    model = get_peft_model(
        base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True)
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    model.train()
    it = iter(loader)
    t0 = 0.0
    for step in range(steps + 2):
        if step == 2:
            _sync(device)
            t0 = time.perf_counter()
        try:
            ids, mask, labels = (t.to(device) for t in next(it))
        except StopIteration:
            it = iter(loader)
            ids, mask, labels = (t.to(device) for t in next(it))
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def _fedlora(
    ds: torch.utils.data.TensorDataset,
    cfg: TrainConfig,
    device: torch.device,
    steps: int,
    quantization: str,
    dp: bool,
) -> float:
    """Train with fedlora's client loop: 2 warm-up steps, then ``steps`` timed ones."""
    from fedlora.models import get_lora_model, set_trainable
    from fedlora.privacy.dpsgd import make_private_lora
    from fedlora.train import train_local

    loaded = get_lora_model(
        "smollm2", "causal-lm", 4, RANK, ALPHA, quantization=quantization, device=str(device.type)
    )
    set_trainable(loaded, RANK, train_a=True)
    model = loaded.peft.to(device)

    holder: dict[str, object] = {}

    def wrap(m, o, loader):  # noqa: ANN001, ANN202 - the Wrap callback
        holder["dp"] = make_private_lora(m, o, loader, noise_multiplier=1.0, max_grad_norm=1.0)
        return tuple(holder["dp"])  # type: ignore[arg-type]

    def run(n: int) -> None:
        train_local(model, ds, replace(cfg, local_steps=n), device, seed=0, wrap=wrap if dp else None)
        if dp:
            holder.pop("dp").release()  # type: ignore[attr-defined]

    run(2)
    _sync(device)
    t0 = time.perf_counter()
    run(steps)
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    """Measure one variant and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU mode only tests the script; one thread is fastest on busy cores
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    train, _ = instruct_splits(512, 8, seed=0)
    ds = encode(train, tok, MAX_LEN, "causal-lm")
    tokens_per_example = float(ds.tensors[1].sum()) / len(ds)
    cfg = TrainConfig(lr=3e-3, batch_size=args.batch_size, local_steps=args.steps, device=device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.variant == "plain":
        seconds = _plain(ds, cfg, device, args.steps)
    else:
        quant = "4bit" if "4bit" in args.variant else "none"
        seconds = _fedlora(ds, cfg, device, args.steps, quant, args.variant.endswith("-dp"))
    # Under DP (Poisson sampling) batches have batch_size examples on average.
    tokens = tokens_per_example * args.batch_size * args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    print(
        json.dumps(
            {
                "variant": args.variant,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "tokens_per_s": round(tokens / seconds, 1),
                "peak_mib": round(peak, 1),
                "seconds": round(seconds, 2),
                "steps": args.steps,
                "batch_size": args.batch_size,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

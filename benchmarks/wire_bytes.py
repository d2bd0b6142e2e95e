"""Bytes on the wire per client and round, per strategy, measured from the messages.

For each method the strategy builds the real payload for one client; the download is the size of
the ``adapter`` (and FLoRA's ``merge``) Flower ``ArrayRecord`` the server sends
(:func:`fedlora.protocol.encode_arrays` / :func:`~fedlora.protocol.record_bytes`), the upload the
``update`` record of the deltas the client must return (:func:`fedlora.protocol.expected_update`).
Each record is in packed form: the float32 values, the manifest of names, shapes and offsets
(compact JSON) and the two arrays' ``.npy`` headers, all counted.
Rounds are driven by real ``aggregate`` calls on random client results, so methods whose payload
grows (FLoRA's cumulative merge) show it. The column "paper" states what each method's paper says
it communicates, in units of one client's LoRA adapter (A and B at its rank).

Shapes: the default model (all-MiniLM-L6-v2, LoRA on query/value, 6 layers of 384 x 384, 4-label
head) and Llama-7B attention (32 layers x q,k,v,o of 4096 x 4096, no head), rank 8/16, 4 clients.

    python -m benchmarks wire_bytes [--quick]
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.harness import machine, markdown_table
from fedlora.adapters import AdapterState, a_name, b_name
from fedlora.protocol import encode_arrays, expected_update, record_bytes
from strategies.base import ClientResult, ClientSpec
from strategies.registry import create

METHODS = ("fedit", "ffa", "fair", "flexlora", "hetlora", "flora")
PAPER = {
    "fedit": "1 adapter down, 1 up (FedAvg of A and B; Zhang et al. 2024)",
    "ffa": "B only: 1/2 adapter down and up (Sun et al. 2024, 'halves the communication')",
    "fair": "same as FedIT: the correction is server-side (Bian et al. 2025)",
    "flexlora": "1 adapter at the client's rank each way (Bai et al. 2024)",
    "hetlora": "1 adapter at the client's rank each way (Cho et al. 2024)",
    "flora": "down: the stacked adapters of all K clients (K adapters); up: 1 (Wang et al. 2024)",
}


def model_state(
    layers: int, dim: int, projections: tuple[str, ...], rank: int, head: int, gen: torch.Generator
) -> AdapterState:
    """Return a PEFT-named adapter state (A random, B zero) with an optional ``head``-label classifier."""
    out: AdapterState = {}
    for i in range(layers):
        for p in projections:
            m = f"base_model.model.encoder.layer.{i}.{p}"
            out[a_name(m)] = torch.randn(rank, dim, generator=gen) / dim**0.5
            out[b_name(m)] = torch.zeros(dim, rank)
    if head:
        out["base_model.model.classifier.modules_to_save.default.weight"] = torch.zeros(head, dim)
        out["base_model.model.classifier.modules_to_save.default.bias"] = torch.zeros(head)
    return out


def measure(method: str, template: AdapterState, clients: int, rounds: int) -> list[dict[str, int]]:
    """Return per-round download/upload bytes of client 0 under ``method``."""
    gen = torch.Generator().manual_seed(1)
    rank = next(v.shape[0] for k, v in template.items() if k.endswith("lora_A.weight"))
    specs = [ClientSpec(i, rank, 2.0 * rank) for i in range(clients)]
    strategy = create(method)
    state = strategy.init_state(template, specs)
    per_round = []
    for _ in range(rounds):
        payload = strategy.payload(state, specs[0])
        down = record_bytes(encode_arrays(payload.adapter))
        down += record_bytes(encode_arrays(payload.merge)) if payload.merge else 0
        up = record_bytes(encode_arrays(expected_update(payload.adapter, payload.train_a)))
        per_round.append({"down": down, "up": up})
        results = []
        for s in specs:
            p = strategy.payload(state, s)
            trained = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in p.adapter.items()}
            full = {**{k: v for k, v in state.items() if k not in trained}, **trained}
            results.append(ClientResult(s, 100, full))
        state = strategy.aggregate(state, results)
    return per_round


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Measure every method on the default model and Llama-7B attention (``quick``: tiny model)."""
    gen = torch.Generator().manual_seed(0)
    if quick:
        models = {"tiny (2 layers, 32x32)": model_state(2, 32, ("query", "value"), 4, 4, gen)}
    else:
        models = {
            "MiniLM default (r=8)": model_state(6, 384, ("query", "value"), 8, 4, gen),
            "Llama-7B attention (r=16)": model_state(
                32, 4096, ("q_proj", "k_proj", "v_proj", "o_proj"), 16, 0, gen
            ),
        }
    clients, rounds = 4, 3
    result: dict[str, Any] = {"clients": clients, "rounds": rounds, "models": {}}
    rows = []
    for model, template in models.items():
        one_adapter = record_bytes(encode_arrays({k: v for k, v in template.items() if "lora_" in k}))
        result["models"][model] = {"lora_adapter_bytes": one_adapter, "methods": {}}
        for method in METHODS:
            per_round = measure(method, template, clients, rounds)
            result["models"][model]["methods"][method] = per_round
            first, last = per_round[0], per_round[-1]
            rows.append(
                [
                    model,
                    method,
                    f"{first['down'] / 2**20:.3f} / {last['down'] / 2**20:.3f}",
                    f"{first['up'] / 2**20:.3f}",
                    f"{first['down'] / one_adapter:.2f} / {last['down'] / one_adapter:.2f}",
                    f"{first['up'] / one_adapter:.2f}",
                    PAPER[method],
                ]
            )
    header = [
        "model",
        "method",
        f"down MiB (round 1 / {rounds})",
        "up MiB",
        f"down in adapters (1 / {rounds})",
        "up in adapters",
        "paper",
    ]
    return {**result, "machine": machine()}, markdown_table(header, rows)

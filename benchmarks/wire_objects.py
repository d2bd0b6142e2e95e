"""Flower objects per train message, per-tensor records against fedlora's packed records.

Flower 1.42 moves a message as a tree of objects (``flwr/supercore/inflatable``): the
``Message``, its ``RecordDict``, each record, each ``Array`` and each distinct chunk of at most
5 MiB of an array's bytes (``ArrayChunk``). Every object is one request on every hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp and back), two at a time by default. This
counts them for the real adapters of MiniLM and SmolLM2-135M (the deployment benchmark's two
models, default target modules), for the round's request (``adapter``) and reply (``update``):

* ``pulled``: the entries of the message's object tree, what a receiver asks for one by one
  (``pull_and_inflate_object_from_tree``);
* ``distinct``: distinct object ids, what a sender pushes (identical chunks, such as two
  all-zero B factors of one shape, are one object).

"per-tensor" is Flower's own form (``ArrayRecord(state_dict)``, one ``Array`` per tensor), which
fedlora sent before; "packed" is :func:`fedlora.protocol.encode_arrays`. Usage::

    python benchmarks/wire_objects.py [--models minilm,smollm2] [--rank 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def object_counts(msg: object) -> tuple[int, int]:
    """Return ``(pulled, distinct)``: the object tree's entries and its distinct object ids."""
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        iterate_object_tree,
    )

    return len(list(iterate_object_tree(get_object_tree(msg)))), len(get_all_nested_objects(msg))


def messages(model: str, rank: int) -> dict[str, object]:
    """Return the round-2-like request and reply of ``model``'s adapter in both forms."""
    import torch
    from flwr.app import ArrayRecord, Message

    from fedlora.models import adapter_state, get_lora_model, init_adapter_state
    from fedlora.protocol import SetupQuery, TrainReply, TrainRequest

    task = "causal-lm" if model == "smollm2" else "classification"
    loaded = get_lora_model(model, task, 4, rank, 2.0 * rank)
    gen = torch.Generator().manual_seed(0)
    # After a round every tensor differs (no two all-zero B factors share a chunk).
    state = {
        k: v + 1e-3 * torch.randn(v.shape, generator=gen)
        for k, v in init_adapter_state(adapter_state(loaded, rank), 0).items()
    }
    request = TrainRequest("{}", (), 2, rank, 2.0 * rank, 0, state).to_message(5)
    reply = Message(
        TrainReply(40, state, {"train-loss": 1.0}).to_content(), reply_to=SetupQuery("{}", ()).to_message(5)
    )
    out: dict[str, object] = {"packed request": request, "packed reply": reply}
    legacy_request = TrainRequest("{}", (), 2, rank, 2.0 * rank, 0, state).to_message(5)
    legacy_request.content["adapter"] = ArrayRecord({k: v.contiguous() for k, v in state.items()})
    legacy_reply = Message(
        TrainReply(40, state, {"train-loss": 1.0}).to_content(), reply_to=SetupQuery("{}", ()).to_message(5)
    )
    legacy_reply.content["update"] = ArrayRecord({k: v.contiguous() for k, v in state.items()})
    out["per-tensor request"], out["per-tensor reply"] = legacy_request, legacy_reply
    out["tensors"] = len(state)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the object counts for each model."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (the deployment benchmark's)")
    args = parser.parse_args(argv)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as a running task
    print(f"{'model':<8} {'tensors':>7} {'message':<19} {'pulled':>6} {'distinct':>8}")
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        msgs = messages(model, args.rank)
        for name in ("per-tensor request", "packed request", "per-tensor reply", "packed reply"):
            pulled, distinct = object_counts(msgs[name])
            print(f"{model:<8} {msgs['tensors']:>7} {name:<19} {pulled:>6} {distinct:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

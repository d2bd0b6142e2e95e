"""Training on trimmed batches: the same per-example losses and gradients as on padded ones."""

import torch
from privacy_models import SEQ, VOCAB, tiny_peft_bert

from fedlora.train import example_losses


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    lengths = torch.tensor([5, 3, 5, 2])  # the longest example uses 5 of SEQ = 8 columns
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, torch.tensor([0, 1, 1, 0])


def _losses_and_grads(batch, trim: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tiny_peft_bert(seed=1)
    if trim:
        losses = example_losses(model, batch, torch.device("cpu"))
    else:
        ids, mask, labels = batch
        logits = model(input_ids=ids, attention_mask=mask).logits
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


def test_trimmed_training_batch_gives_the_padded_batchs_losses_and_gradients():
    batch = _padded_batch()
    padded_losses, padded_grads = _losses_and_grads(batch, trim=False)
    trimmed_losses, trimmed_grads = _losses_and_grads(batch, trim=True)
    torch.testing.assert_close(trimmed_losses, padded_losses, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == trimmed_grads.keys() and any("lora_A" in n for n in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_trimming_is_what_changes_the_work_not_a_no_op():
    ids, mask, labels = _padded_batch()
    seen: list[int] = []
    model = tiny_peft_bert(seed=1)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    example_losses(model, (ids, mask, labels), torch.device("cpu"))
    hook.remove()
    assert seen == [5]  # ran 5 columns, not SEQ = 8

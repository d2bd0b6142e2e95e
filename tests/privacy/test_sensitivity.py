"""Sensitivity under record-level DP: an example's per-sample gradient ignores its batch-mates.

DP-SGD clips each per-sample gradient to C, which bounds one record's influence only if that
gradient is a function of the record alone. A causal-LM loss averaged over all tokens of the
batch breaks this: an example's gradient is weighted by its share of the batch's response
tokens, so a batch-mate with a longer or shorter response rescales it. The adversary is
anyone who controls or knows other records in a batch (another record of the same client).
"""

import torch
from opacus import GradSampleModule
from peft import LoraConfig, get_peft_model
from privacy_models import SEQ, VOCAB, tiny_peft_bert
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora.train import forward_loss


def _tiny_peft_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def _causal_batch(response_lengths, seed):
    """Rows of SEQ tokens: a 2-token prompt (masked), then a response of the given length, then pad."""
    g = torch.Generator().manual_seed(seed)
    n = len(response_lengths)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    labels = torch.full((n, SEQ), -100)
    mask = torch.zeros(n, SEQ, dtype=torch.long)
    for i, length in enumerate(response_lengths):
        mask[i, : 2 + length] = 1
        labels[i, 2 : 2 + length] = ids[i, 2 : 2 + length]
    return ids, mask, labels


def _first_example_grad(model, batch, loss_fn):
    """Per-sample gradient (Opacus hooks, mean reduction as in training) of example 0."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        gsm.train()
        gsm.zero_grad()
        loss_fn(gsm, batch).backward()
        return torch.cat([p.grad_sample[0].flatten() for p in gsm.parameters() if p.requires_grad])
    finally:
        gsm.to_standard_module()
        for p in model.parameters():
            p.grad = None


def _ours(model, batch):
    return forward_loss(model, batch, torch.device("cpu"))


def _batch_token_mean(model, batch):
    # The loss fedlora used before: transformers' token mean over the whole batch.
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _with_mates(batch, mates):
    return tuple(torch.cat([b[:1], m]) for b, m in zip(batch, mates, strict=True))


def test_causal_lm_per_sample_gradient_is_independent_of_batch_mates():
    model = _tiny_peft_llama()
    me = _causal_batch([3], seed=1)
    short = _with_mates(me, _causal_batch([1, 1, 1], seed=2))
    long = _with_mates(me, _causal_batch([5, 5, 5], seed=3))
    g_short, g_long = _first_example_grad(model, short, _ours), _first_example_grad(model, long, _ours)
    assert g_short.norm() > 0
    torch.testing.assert_close(g_short, g_long, rtol=1e-5, atol=1e-8)
    alone = _first_example_grad(model, me, _ours)
    torch.testing.assert_close(g_short, alone, rtol=1e-5, atol=1e-8)


def test_batch_token_mean_lets_batch_mates_rescale_a_gradient():
    # The detector above is sharp: the old loss moves example 0's gradient by a large factor.
    model = _tiny_peft_llama()
    me = _causal_batch([3], seed=1)
    g_short = _first_example_grad(model, _with_mates(me, _causal_batch([1, 1, 1], seed=2)), _batch_token_mean)
    g_long = _first_example_grad(model, _with_mates(me, _causal_batch([5, 5, 5], seed=3)), _batch_token_mean)
    ratio = float(g_short.norm() / g_long.norm())
    assert ratio > 2.0  # 4 * 3/6 = 2 vs 4 * 3/18 = 0.67 -> about 3x


def test_classification_per_sample_gradient_is_independent_of_batch_mates():
    model = tiny_peft_bert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (7, SEQ), generator=g)
    mask = torch.ones(7, SEQ, dtype=torch.long)
    mask[1:4, SEQ // 2 :] = 0  # batch-mates of different lengths
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 1])
    first = (ids[:4], mask[:4], labels[:4])
    second = (
        torch.cat([ids[:1], ids[4:]]),
        torch.cat([mask[:1], mask[4:]]),
        torch.cat([labels[:1], labels[4:]]),
    )
    g1, g2 = _first_example_grad(model, first, _ours), _first_example_grad(model, second, _ours)
    assert g1.norm() > 0
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)

"""Tiny PEFT-wrapped BERT models and token data for the DP-SGD tests (helpers, not tests)."""

import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ = 100, 8


def tiny_peft_bert(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], lora_dropout=0.0
    )
    model = get_peft_model(BertForSequenceClassification(config), lora)
    # PEFT initialises B to zero; start from non-zero B so products and gradients are generic.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def token_loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    labels = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(ids, mask, labels), batch_size=batch_size, generator=g)

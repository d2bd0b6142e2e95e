"""fedlora: federated LoRA fine-tuning of pretrained transformers (core library, no Flower imports)."""

__version__ = "0.1.0"

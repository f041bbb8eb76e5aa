"""bganalysis: knowledge distillation with hard, soft and hybrid labels, exposure bias and Bridge/Garden maps."""

__version__ = "0.1.0"

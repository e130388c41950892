"""tropd-ds: Trust Region On-Policy Distillation under DeepSpeed."""

__version__ = "0.1.0"

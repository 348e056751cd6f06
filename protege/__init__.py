"""protege: RL-style on-policy distillation of LLMs on Ray."""

__version__ = "0.1.0"

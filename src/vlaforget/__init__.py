"""vlaforget: study and fight catastrophic forgetting when fine-tuning VLA models."""

__version__ = "0.1.0"

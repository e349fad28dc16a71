"""bltool: Budgeted LoRA distillation, from a teacher LM to a student that is cheaper to serve."""

__version__ = "0.1.0"

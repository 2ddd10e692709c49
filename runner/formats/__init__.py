"""File formats other tools read and write: kohya LoRA files, A1111's parameters text, LDM single files."""

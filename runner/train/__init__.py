"""Training: the loop, the LoRA network, optimizers and presets; what differs per family comes from runner.families."""

"""Generation: previews, /gen and grids over warm pipelines with LoRAs hot-swapped."""

"""Model families (SD1.5, SDXL, Flux.1, Z-Image): everything that differs between them, one module each."""

"""The GPU side: jobs described by ``runner.spec`` in, events out; never imports ``bot``."""

"""The only layer that knows everything: config, the build recipe (boot.py), the vCPU loop,
Machine (docs/architecture.md)."""

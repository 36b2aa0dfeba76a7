"""The only layer that knows everything: config, builder, vCPU loop, Machine."""

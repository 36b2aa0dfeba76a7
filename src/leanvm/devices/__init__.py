"""Device models. Each sees only offsets within its own range and never imports kvm/."""

"""virtio devices (virtio 1.2): the split virtqueue (queue.py), the MMIO transport (mmio.py)
and one file per device (mem.py)."""

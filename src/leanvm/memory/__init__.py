"""Guest memory: host mappings, guest regions, bounds-checked access, residency accounting."""

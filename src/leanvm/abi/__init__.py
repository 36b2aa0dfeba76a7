"""C structures and constants of the interfaces leanvm speaks (ctypes only, no logic)."""

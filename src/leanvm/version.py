"""leanvm's version (layer 0: any module may import it; pyproject.toml carries the same)."""

__version__ = "0.1.0"

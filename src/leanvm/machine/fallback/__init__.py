"""The emulation fallback: run the instructions this host's KVM cannot emulate in Unicorn.

handler.py holds Fallback (the vCPU loop's hook and its counts), engine.py the per-vCPU
Unicorn step over copied guest state, decode.py Capstone decoding and what is refused.
docs/emulation.md describes it for users. Unicorn and Capstone load on first use.
"""

from __future__ import annotations

from leanvm.machine.fallback.handler import Fallback

__all__ = ["Fallback"]

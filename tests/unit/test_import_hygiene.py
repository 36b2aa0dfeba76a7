"""No work at import time: importing leanvm's modules opens nothing, starts no thread and
pulls in no heavy dependency that the boot path does not need."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import os, sys, threading
before_fds = set(os.listdir('/proc/self/fd'))
before_threads = threading.active_count()
import pkgutil, importlib, leanvm
assert 'leanvm.machine.machine' not in sys.modules, 'import leanvm must be lazy'
for info in pkgutil.walk_packages(leanvm.__path__, 'leanvm.'):
    if info.name != 'leanvm.__main__':
        importlib.import_module(info.name)
after_fds = set(os.listdir('/proc/self/fd'))
assert after_fds <= before_fds | {max(after_fds, key=int)} or after_fds == before_fds, after_fds - before_fds
assert threading.active_count() == before_threads
print('ok')
"""

BOOT_PATH = r"""
import sys
import leanvm.cli.main, leanvm.cli.run, leanvm.machine.machine, leanvm.machine.cpu
import leanvm.kvm.system, leanvm.loader.bare, leanvm.loader.image
heavy = sorted(m for m in ('rich', 'elftools', 'dataclasses', 'leanvm.memory.residency')
               if m in sys.modules)
print(' '.join(heavy) or 'none')
"""


def test_importing_everything_does_no_work() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_boot_path_stays_light() -> None:
    """Start-up time is a target (< 100 ms to the first guest instruction): the modules on
    the way there must not import rich, pyelftools or dataclasses."""
    done = subprocess.run([sys.executable, "-c", BOOT_PATH], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"

"""Where a QMP server listens: QEMU's -qmp spelling, checked when the config is made.

    unix:PATH[,server=on][,wait=off]     a Unix socket (mode 0600), the usual choice
    tcp:HOST:PORT[,server=on][,wait=off] TCP on the address named (never a default one)
    PATH                                 a Unix socket, not waiting (Machine(qmp="path"))

``server=off`` (QEMU connecting out to a listener) is not offered. ``wait=on`` (QEMU's
default for a server) holds the vCPUs until the first client connects; the bare path form
does not wait.
"""

from __future__ import annotations

from typing import NamedTuple

from leanvm.errors import ConfigError

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class QmpAddress(NamedTuple):
    kind: str  # "unix" or "tcp"
    path: str = ""  # unix
    host: str = ""  # tcp
    port: int = 0  # tcp; 0: any free port (Machine.qmp_address says which)
    wait: bool = False  # hold the vCPUs until a client connects

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def _on_off(value: str, name: str, text: str, what: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ConfigError(f"bad {what} {text!r}: {name}={value!r}, expected on or off")


def parse_qmp_address(text: "str | QmpAddress", what: str = "-qmp") -> QmpAddress:
    """``text`` as a QmpAddress; ``what`` names it in errors (-qmp, or a client's address)."""
    if isinstance(text, QmpAddress):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"bad {what} {text!r}: expected unix:PATH,server=on,wait=off or "
                          "tcp:HOST:PORT,server=on,wait=off")
    if not text.startswith(("unix:", "tcp:")):
        return _unix(text, text, False, what)
    head, *options = text.split(",")
    wait = True  # QEMU's default for a server socket
    for option in options:
        key, eq, value = option.partition("=")
        key = key.strip()
        if key in ("server", "wait", "nowait", "nodelay") and not eq:
            value = "on"  # QEMU's older spelling: ,server,nowait
        if key == "server":
            if not _on_off(value, key, text, what):
                raise ConfigError(f"bad {what} {text!r}: leanvm's QMP socket is always a server "
                                  "(server=on)")
        elif key == "wait":
            wait = _on_off(value, key, text, what)
        elif key == "nowait":
            wait = not _on_off(value, key, text, what)
        elif key != "nodelay":
            raise ConfigError(f"bad {what} {text!r}: unknown option {key!r} (expected server, "
                              "wait)")
    kind, _, rest = head.partition(":")
    if kind == "unix":
        return _unix(rest, text, wait, what)
    host, colon, port = rest.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"bad {what} {text!r}: expected tcp:HOST:PORT with a port 0-65535 "
                          "and a host to listen on, e.g. tcp:127.0.0.1:4444")
    return QmpAddress("tcp", host=host, port=int(port), wait=wait)


def _unix(path: str, text: str, wait: bool, what: str) -> QmpAddress:
    if not path:
        raise ConfigError(f"bad {what} {text!r}: no socket path")
    if "\0" in path or len(path.encode()) > UNIX_PATH_MAX:
        raise ConfigError(f"bad {what} socket path {path!r}: at most {UNIX_PATH_MAX} bytes "
                          "with no NUL (a Unix socket's limit)")
    return QmpAddress("unix", path=path, wait=wait)

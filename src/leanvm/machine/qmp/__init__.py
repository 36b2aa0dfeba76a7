"""QMP, the QEMU Machine Protocol, for leanvm machines: the address syntax (address.py),
the byte stream cut into bounded JSON messages (stream.py), one client's protocol state
(session.py), the commands (commands.py, hmp.py) and the socket server (server.py).
docs/qmp.md lists every command and event and how each differs from QEMU's."""

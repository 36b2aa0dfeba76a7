"""Cutting a QMP byte stream into JSON messages, with bounds a hostile client cannot pass.

QMP is a stream of JSON objects with no framing: a client may send one object over several
writes, or several in one (QEMU's json-streamer tracks nesting; newlines are optional).
This splitter does the same with a few regular-expression scans per chunk: outside strings
it tracks ``{`` ``[`` and ``}`` ``]``, inside strings it skips escapes. A message ends when
its nesting returns to zero. Limits, as QEMU's (qobject/json-streamer.c): nesting deeper
than MAX_NESTING is an error, after which the rest of that message (to the next newline
outside strings, or the end of the nesting) is dropped; a message longer than MAX_MESSAGE
bytes is an error that ends the connection (it is never buffered). Text outside any
object (``garbage``) becomes one message of its own, which then fails to parse, so the
client gets QEMU's "JSON parse error".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_NESTING = 1024  # QEMU: MAX_NESTING (1 << 10)
MAX_MESSAGE = 1 << 20  # bytes of one message; QEMU allows 64 MiB tokens, leanvm 1 MiB

_STRUCTURE = re.compile(rb'[{}\[\]"\n]')  # what matters outside a string
_IN_STRING = re.compile(rb'["\\]')  # what matters inside one
_NON_BLANK = re.compile(rb"[^ \t\r\n]")


@dataclass(frozen=True, slots=True)
class Message:
    """One complete message's bytes, or an error the server answers with (``fatal``:
    then closes the connection)."""

    data: bytes = b""
    error: str = ""
    fatal: bool = False


class JsonSplitter:
    __slots__ = ("_buffer", "_depth", "_in_string", "_escape", "_scanned", "_start",
                 "_skipping", "_scalar")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._depth = 0  # nesting of the message being read
        self._in_string = False
        self._escape = False  # the last byte scanned was a backslash inside a string
        self._scanned = 0  # bytes of the buffer already scanned
        self._start = -1  # where the current message starts (-1: between messages)
        self._skipping = False  # dropping the rest of a message that nested too deep
        self._scalar = False  # the current message is text outside any object

    def feed(self, data: bytes) -> list[Message]:
        """The messages ``data`` completes, in order."""
        self._buffer += data
        out: list[Message] = []
        buffer = self._buffer
        i, end = self._scanned, len(buffer)
        while i < end:
            if self._start < 0:  # between messages: skip blanks
                match = _NON_BLANK.search(buffer, i)
                if match is None:
                    i = end
                    break
                i = self._start = match.start()
                self._scalar = buffer[i] not in b"{["
            if self._in_string:
                i = self._string(buffer, i, end)
                continue
            match = _STRUCTURE.search(buffer, i)
            if match is None:
                i = end
                break
            char, i = buffer[match.start()], match.end()
            if char == 0x22:  # "
                self._in_string = True
            elif char == 0x0A:  # newline outside a string
                if self._skipping or (self._scalar and self._depth == 0):
                    self._finish(out, i - 1)
            elif self._scalar and self._depth == 0 and char in b"{[":
                self._finish(out, i - 1)  # text before an object is a message of its own
                self._start, self._scalar, self._depth = i - 1, False, 1
            elif char in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING and not self._skipping:
                    self._skipping = True
                    out.append(Message(error="JSON nesting depth limit exceeded"))
            elif self._depth > 0:  # } or ]
                self._depth -= 1
                if self._depth == 0:
                    self._finish(out, i)
        # drop what is done with: everything before the message being read
        keep = self._start if self._start >= 0 else i
        if keep:
            del buffer[:keep]
            i -= keep
            if self._start >= 0:
                self._start = 0
        self._scanned = i
        if self._start >= 0 and i > MAX_MESSAGE:
            out.append(Message(error="JSON token size limit exceeded", fatal=True))
            self._reset()
        return out

    def _string(self, buffer: bytearray, i: int, end: int) -> int:
        """Scan on inside a string from ``i``; where scanning goes on."""
        if self._escape:
            self._escape = False
            return i + 1
        match = _IN_STRING.search(buffer, i)
        if match is None:
            return end
        i = match.end()
        if buffer[i - 1] == 0x5C:  # backslash: the next byte is escaped
            self._escape = True
        else:
            self._in_string = False
        return i

    def _finish(self, out: list[Message], end: int) -> None:
        """The message from ``_start`` to ``end`` is complete."""
        if not self._skipping:
            data = bytes(self._buffer[self._start:end]).strip()
            if data:
                out.append(Message(data))
        self._start, self._depth, self._skipping, self._scalar = -1, 0, False, False
        self._in_string = self._escape = False

    def _reset(self) -> None:
        self._buffer.clear()
        self._scanned, self._start, self._depth = 0, -1, 0
        self._in_string = self._escape = self._skipping = self._scalar = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def _no_constants(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def parse(data: bytes) -> tuple[Any, str]:
    """(value, "") or (None, QEMU's parse error text)."""
    try:
        return json.loads(data, parse_constant=_no_constants), ""
    except RecursionError:
        return None, "JSON nesting depth limit exceeded"
    except UnicodeDecodeError:
        return None, "JSON parse error, invalid UTF-8 sequence in string"
    except ValueError as exc:
        text = str(exc)
        if text.startswith("invalid keyword"):
            return None, f"JSON parse error, {text}"
        word = data.split(None, 1)[0][:64].decode("utf-8", "replace") if data.split() else ""
        if word and word[0] not in "{[\"-0123456789":
            return None, f"JSON parse error, invalid keyword '{word}'"
        return None, "JSON parse error, " + text.split(":")[0].lower()

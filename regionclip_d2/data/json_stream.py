"""A streaming reader of one JSON document (COCO Captions files can be gigabytes): walks the
top-level object and its arrays one element at a time."""
import codecs
import gzip
import json
import os

JSON_CHUNK_BYTES = 1 << 20  # read size of the streaming COCO JSON parser (bytes)


class CaptionFormatError(ValueError):
    """A caption file that cannot be read in the declared or detected format."""


def open_binary(path: str):
    """A caption file (``.gz`` decompressed on the fly) opened for binary reading."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path!r} does not exist: check the path")
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


_NUMBER_CHARS = frozenset("0123456789.eE+-")


class _JsonStream:
    """Incremental reader of one JSON document: walks the top-level object and its arrays
    one element at a time (memory: one element plus a read buffer)."""

    def __init__(self, f, path: str, chunk: int = None):
        self.f, self.path, self.chunk = f, path, chunk or JSON_CHUNK_BYTES
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self.buf, self.pos, self.eof = "", 0, False
        self.json = json.JSONDecoder()

    def _fill(self, size=None) -> bool:
        if self.eof:
            return False
        raw = self.f.read(size or self.chunk)
        text = self.decoder.decode(raw, final=not raw)
        self.eof = not raw
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        return bool(raw) or bool(text)

    def peek(self) -> str:
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, ch: str):
        got = self.peek()
        if got != ch:
            self.error(f"expected {ch!r}, found {got or 'end of file'!r}")
        self.pos += 1

    def error(self, msg):
        raise CaptionFormatError(f"{self.path!r} is not valid COCO Captions JSON: {msg} (fix or re-export the "
                                 "file; for JSON Lines use format 'jsonl')")

    def value(self):
        self.peek()
        while True:
            try:
                obj, end = self.json.raw_decode(self.buf, self.pos)
                # a number may continue in the next chunk: "12" | "3", and also "0" | ".5" or
                # "1e" | "5", which the decoder reads as 0 or 1 followed by junk
                number = isinstance(obj, (int, float)) and not isinstance(obj, bool)
                if self.eof or (end < len(self.buf) and not (number and self.buf[end] in _NUMBER_CHARS)):
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof:
                    self.error(f"{e.msg} (character {e.pos} of the remaining text)")
            except RecursionError:
                self.error("a value is nested too deeply")
            self._fill(max(self.chunk, len(self.buf) - self.pos))  # grow geometrically for big values

    def elements(self):
        """Yield the elements of the array at the current position."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            c = self.peek()
            self.pos += 1
            if c == "]":
                return
            if c != ",":
                self.error(f"expected ',' or ']' in an array, found {c or 'end of file'!r}")

    def array(self, key: str):
        """Yield the elements of the top-level array ``key``; other values are skipped
        element by element. Yields nothing if there is no such key."""
        self.expect("{")
        if self.peek() == "}":
            return
        while True:
            k = self.value()
            if not isinstance(k, str):
                self.error("expected a key string")
            self.expect(":")
            if self.peek() == "[":
                if k == key:
                    yield from self.elements()
                    return
                for _ in self.elements():
                    pass
            else:
                self.value()
            c = self.peek()
            self.pos += 1
            if c == "}":
                return
            if c != ",":
                self.error(f"expected ',' or '}}' after the value of {k!r}, found {c or 'end of file'!r}")


def _json_array(path: str, key: str):
    with open_binary(path) as f:
        yield from _JsonStream(f, path).array(key)


def _has_key(path: str, key: str) -> bool:
    """Whether the top-level object of a JSON file has ``key`` holding a list (streaming scan)."""
    with open_binary(path) as f:
        s = _JsonStream(f, path)
        s.expect("{")
        if s.peek() == "}":
            return False
        while True:
            k = s.value()
            s.expect(":")
            if k == key and s.peek() == "[":
                return True
            if s.peek() == "[":
                for _ in s.elements():
                    pass
            else:
                s.value()
            c = s.peek()
            s.pos += 1
            if c != ",":
                return False



"""Client of the skiff data service, for functions written in Python.

    import skiff_data as data

    entry = data.get("counters/hits")     # Entry(key, value: bytes, version), or None
    version = data.put("counters/hits", "1", expect_version=0)
    data.delete("counters/hits")          # the version it had, or None if it was absent
    for entry in data.list("counters/"):  # follows pages until the end
        print(entry.key, entry.value)

A refused or failed request raises DataError; its `code` is "denied", "conflict" (then
`current` is the key's version, 0 if absent), "invalid", "not_found" or "unavailable".
The module-level functions share one connection, opened on first use, to
$SKIFF_DATA_SOCKET or /run/skiff/data.sock. The protocol is in docs/data-service.md.
"""

import base64
import json
import os
import socket
from collections import namedtuple

SOCKET_PATH = os.environ.get("SKIFF_DATA_SOCKET", "/run/skiff/data.sock")
# A list page is cut at 4 MiB after its first entry; one escaped 1 MiB value can reach 6 MiB.
RESPONSE_BYTES_MAX = 16 * 1024 * 1024

Entry = namedtuple("Entry", "key value version")


class DataError(Exception):
    def __init__(self, code, message, current=None):
        super().__init__(message)
        self.code = code
        self.current = current


class Client:
    """One connection; requests on it are answered in order."""

    def __init__(self, path=SOCKET_PATH):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._reader = self._sock.makefile("rb")

    def close(self):
        self._reader.close()
        self._sock.close()

    def get(self, key):
        reply = self._call({"op": "get", "key": key})
        if not reply["found"]:
            return None
        return Entry(key, _value(reply), reply["version"])

    def put(self, key, value, expect_version=None):
        """Stores value (str or bytes); returns the new version."""
        request = {"op": "put", "key": key, "expect_version": expect_version}
        if isinstance(value, str):
            request["value"] = value
        else:
            try:
                request["value"] = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                request["value_b64"] = base64.b64encode(value).decode("ascii")
        return self._call(request)["version"]

    def delete(self, key, expect_version=None):
        request = {"op": "delete", "key": key, "expect_version": expect_version}
        try:
            return self._call(request)["version"]
        except DataError as e:
            if e.code == "not_found":
                return None
            raise

    def list(self, prefix):
        start_after = None
        while True:
            request = {"op": "list", "prefix": prefix, "start_after": start_after}
            reply = self._call(request)
            for e in reply["entries"]:
                yield Entry(e["key"], _value(e), e["version"])
            start_after = reply.get("next")
            if start_after is None:
                return

    def _call(self, request):
        line = json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n"
        self._sock.sendall(line)
        line = self._reader.readline(RESPONSE_BYTES_MAX)
        if not line.endswith(b"\n"):
            raise DataError("unavailable", "the data service closed the connection")
        reply = json.loads(line)
        if not reply["ok"]:
            raise DataError(reply["code"], reply["error"], reply.get("current"))
        return reply


def _value(obj):
    if "value" in obj:
        return obj["value"].encode("utf-8")
    return base64.b64decode(obj["value_b64"])


_shared = None


def _client():
    global _shared
    if _shared is None:
        _shared = Client()
    return _shared


def get(key):
    return _client().get(key)


def put(key, value, expect_version=None):
    return _client().put(key, value, expect_version)


def delete(key, expect_version=None):
    return _client().delete(key, expect_version)


def list(prefix):
    return _client().list(prefix)

"""A direct TCP channel to the router actor, beside Ray's actor calls.

A Ray actor call round trip costs about 0.8 ms on an idle 2-core machine
(task submission, the raylet-free direct call, the asyncio bridge on the
caller's side); the routing decision itself is 20-200 us. The ingress asks
the router once per request before the first byte, so that hop was most of
what the gateway adds to time to first byte. Over one persistent TCP
connection per ingress replica the same round trip is 30-50 us.

The actor serves the channel on its own event loop (it is an async actor),
so channel calls and Ray calls run one at a time on one thread, exactly as
before: the router keeps a single writer. Only a few methods are offered
(`ALLOWED`); everything else (engine snapshots, admin) stays on Ray.

Frames: a 4-byte big-endian length, then a pickle of
`(call_id, method, args)` (client -> actor; call_id 0 wants no reply) or
`(call_id, ok, value)` (actor -> client). A connection must first send the
32-byte token the actor handed out through Ray (a trusted channel); without
it the actor closes the connection having unpickled nothing, so the port
accepts pickles only from callers that could reach the actor through Ray
anyway. Frames on one connection are handled in order, so a fire-and-forget
batch sent before a call lands before it.

The channel is an optimisation, never a dependency: a caller that cannot
open it, or whose connection breaks (the actor restarted), uses Ray's actor
calls, which own restarts and retries (serving.ray.router_actor.RayRouter).
No Ray import here.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import pickle
import secrets
import struct
from typing import Any, Callable

ALLOWED = frozenset({"route", "predict", "events", "stats", "set_circuit"})
TOKEN_BYTES = 32
MAX_FRAME = 64 << 20
_LEN = struct.Struct("!I")


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def _frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(n))


class ChannelServer:
    """The actor's end: the listener and its live connections."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening and drop every connection (their callers go over Ray)."""
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()


async def serve(handler: Callable[[str, tuple], Any], host: str, token: bytes,
                port: int = 0) -> ChannelServer:
    """Serve `handler(method, args)` for methods in ALLOWED on host:port (0: any free port)."""
    out = ChannelServer()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out.writers.add(writer)
        try:
            got = await asyncio.wait_for(reader.readexactly(len(token)), 10.0)
            if not hmac.compare_digest(got, token):
                return
            while True:
                call_id, method, args = await _read_frame(reader)
                try:
                    if method not in ALLOWED:
                        raise ValueError(f"method {method!r} is not offered on the channel")
                    reply = (call_id, True, handler(method, args))
                except Exception as e:  # the caller raises it; the connection stays up
                    reply = (call_id, False, f"{type(e).__name__}: {e}")
                if call_id:
                    try:
                        data = _frame(reply)
                    except Exception as e:  # the value does not pickle: say so, keep the connection
                        data = _frame((call_id, False, f"unpicklable reply: {type(e).__name__}: {e}"))
                    writer.write(data)
                    if writer.transport.get_write_buffer_size() > (1 << 20):
                        await writer.drain()  # a caller that stopped reading: wait for it
        except Exception:  # noqa: BLE001 - went away, timed out, or sent what does not unpickle
            pass  # drop this caller's connection only
        finally:
            out.writers.discard(writer)
            writer.close()

    out.server = await asyncio.start_server(connection, host, port)
    return out


class ChannelClosed(ConnectionError):
    """The connection is gone; the call may or may not have reached the actor."""


class RemoteError(RuntimeError):
    """The actor's method raised something other than its own error values."""


class Channel:
    """The caller's end: concurrent calls multiplexed over one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self._reader = asyncio.get_running_loop().create_task(self._read(reader))

    @classmethod
    async def open(cls, host: str, port: int, token: bytes, timeout_s: float = 2.0) -> "Channel":
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.write(token)
        return cls(reader, writer)

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> asyncio.Future:
        """Send one call; the future resolves to its value, or raises ChannelClosed,
        RemoteError, or TimeoutError after `timeout_s` (a timer on the loop: awaiting the
        future directly saves the two extra loop turns asyncio.wait_for takes)."""
        call_id = next(self._ids)
        self._write(_frame((call_id, method, args)))  # (no reply is read before the future exists)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending[call_id] = fut
        if timeout_s is not None:
            timer = loop.call_later(timeout_s, self._expire, call_id)
            fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def _write(self, frame: bytes) -> None:
        """One frame out, or ChannelClosed: the connection can be gone before the reader has
        seen it go (uvloop raises on a write to a closed transport; asyncio drops it)."""
        if self.closed:
            raise ChannelClosed("channel closed")
        try:
            if self._writer.is_closing():
                raise ConnectionResetError("the connection is closing")
            self._writer.write(frame)
        except (RuntimeError, ConnectionError, OSError) as e:
            exc = ChannelClosed(f"router channel lost: {type(e).__name__}")
            self._reader.cancel()
            self._shut(exc)
            raise exc from None

    def _expire(self, call_id: int) -> None:
        fut = self._pending.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError(f"no answer from the router in time (call {call_id})"))

    def send(self, method: str, *args: Any) -> None:
        """Fire and forget (no reply); lost if the connection breaks before it is read."""
        self._write(_frame((0, method, args)))

    def close(self) -> None:
        if not self.closed:
            self._reader.cancel()
            self._shut(ChannelClosed("channel closed by its owner"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                call_id, ok, value = await _read_frame(reader)
                fut = self._pending.pop(call_id, None)
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(RemoteError(value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, pickle.UnpicklingError, EOFError) as e:
            self._shut(ChannelClosed(f"router channel lost: {type(e).__name__}"))

    def _shut(self, exc: ChannelClosed) -> None:
        self.closed = True
        self._writer.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

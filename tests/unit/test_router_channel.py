"""serving.ray.channel: the direct TCP channel to the router actor, and RayRouter over it.

Real sockets on 127.0.0.1, no Ray: the server end wraps a plain handler (the
actor wraps its own methods the same way), and RayRouter gets a stand-in
actor handle whose `channel` method hands out the server's address and token.
"""

import asyncio
import struct

import pytest

from serving.ray import channel as chan

pytest.importorskip("ray")
from serving.ray.router_actor import RayRouter  # noqa: E402
from serving.types import RouteRequest  # noqa: E402

TOKEN = b"t" * chan.TOKEN_BYTES


class Calls:
    """The handler: records (method, args) and answers by method."""

    def __init__(self):
        self.seen: list[tuple[str, tuple]] = []

    def __call__(self, method, args):
        self.seen.append((method, args))
        if method == "stats":
            if args and args[0] == "boom":
                raise KeyError("boom")
            return {"events_seen": sum(1 for m, _ in self.seen if m == "events")}
        if method == "predict":
            return lambda: None  # does not pickle
        return ("decided", args[0].request_id) if method == "route" else None


async def _pair(token: bytes = TOKEN):
    calls = Calls()
    server = await chan.serve(calls, "127.0.0.1", TOKEN)
    port = server.port
    ch = await chan.Channel.open("127.0.0.1", port, token)
    return calls, server, port, ch


def _req(i: int) -> RouteRequest:
    return RouteRequest(f"r{i}", "m", 10, (1, 2, 3), 16, "us")


def test_concurrent_calls_come_back_to_their_callers():
    async def main():
        calls, server, _, ch = await _pair()
        out = await asyncio.gather(*(ch.call("route", _req(i)) for i in range(50)))
        ch.close()
        server.close()
        return out, calls
    out, calls = asyncio.run(main())
    assert out == [("decided", f"r{i}") for i in range(50)]
    assert [a[0].block_hashes for _, a in calls.seen] == [(1, 2, 3)] * 50  # arguments arrive intact


def test_fire_and_forget_lands_before_a_later_call():
    async def main():
        calls, server, _, ch = await _pair()
        ch.send("events", [("done", "r1", True)])
        ch.send("events", [("done", "r2", True)])
        st = await ch.call("stats")
        ch.close()
        server.close()
        return st
    assert asyncio.run(main()) == {"events_seen": 2}


def test_errors_come_back_and_the_connection_stays_up():
    async def main():
        calls, server, _, ch = await _pair()
        with pytest.raises(chan.RemoteError, match="not offered"):
            await ch.call("remove", "replica-1")  # only ALLOWED methods: never the admin ones
        with pytest.raises(chan.RemoteError, match="KeyError"):
            await ch.call("stats", "boom")
        with pytest.raises(chan.RemoteError, match="unpicklable reply"):
            await ch.call("predict", _req(0))
        ok = await ch.call("route", _req(1))
        ch.close()
        server.close()
        return ok, calls
    ok, calls = asyncio.run(main())
    assert ok == ("decided", "r1") and "remove" not in [m for m, _ in calls.seen]


def test_wrong_token_is_dropped_before_anything_is_unpickled():
    async def main():
        calls, server, _, ch = await _pair(token=b"x" * chan.TOKEN_BYTES)
        with pytest.raises(chan.ChannelClosed):
            await asyncio.wait_for(ch.call("route", _req(1)), 5)
        server.close()
        return calls
    assert asyncio.run(main()).seen == []


def test_oversized_frame_drops_the_connection():
    async def main():
        calls, server, port, ch = await _pair()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(TOKEN + struct.pack("!I", chan.MAX_FRAME + 1))
        eof = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        ch.close()
        server.close()
        await asyncio.sleep(0.01)
        return eof, calls
    eof, calls = asyncio.run(main())
    assert eof == b"" and calls.seen == []


def test_lost_connection_fails_pending_calls():
    async def main():
        calls, server, _, ch = await _pair()
        await ch.call("route", _req(0))
        server.close()  # the actor process died: its connections close
        with pytest.raises(chan.ChannelClosed):
            await asyncio.wait_for(ch.call("route", _req(1)), 5)
        assert ch.closed
        with pytest.raises(chan.ChannelClosed):
            ch.send("events", [])
        await asyncio.sleep(0.01)
    asyncio.run(main())


class _Remote:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def remote(self, *args):  # like an ObjectRef: awaited for an answer, or left (fire and forget)
        self.calls += 1
        ref = asyncio.get_running_loop().create_future()
        ref.set_result(self.fn(*args))
        return ref


class FakeActor:
    """An actor handle: Ray calls answer directly; `channel` hands out a real server's address."""

    def __init__(self, address):
        self.route = _Remote(lambda req: ("over ray", req.request_id))
        self.events = _Remote(lambda batch: None)
        self.channel = _Remote(lambda: address)


async def _client_with_channel():
    """A RayRouter over a fake actor and a real channel server, its first call made over Ray
    (the channel opens in the background meanwhile), and the channel open."""
    calls = Calls()
    server = await chan.serve(calls, "127.0.0.1", TOKEN)
    actor = FakeActor(("127.0.0.1", server.port, TOKEN))
    rr = RayRouter(actor, channel_retry_s=0.05)
    first = await rr.route(_req(0))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if rr._chan is not None:
            break
    return calls, server, actor, rr, first


def test_router_client_uses_the_channel_once_open_and_ray_when_it_is_lost():
    async def main():
        calls, server, actor, rr, first = await _client_with_channel()
        second = await rr.route(_req(1))
        rr.finished("r1", True)
        rr.flush()
        await asyncio.sleep(0.05)
        server.close()  # the router restarted: Ray carries the next call
        await asyncio.sleep(0.05)
        third = await rr.route(_req(2))
        return first, second, third, rr, actor, calls
    first, second, third, rr, actor, calls = asyncio.run(main())
    assert first == ("over ray", "r0") and second == ("decided", "r1") and third == ("over ray", "r2")
    assert ("events", ([("done", "r1", True)],)) in calls.seen and actor.events.calls == 0
    assert rr.channel_calls == 1 and actor.route.calls == 2


def test_router_client_without_channel_uses_ray_only():
    async def main():
        actor = FakeActor(None)
        rr = RayRouter(actor, channel=False)
        out = [await rr.route(_req(i)) for i in range(3)]
        return out, actor
    out, actor = asyncio.run(main())
    assert out == [("over ray", f"r{i}") for i in range(3)] and actor.channel.calls == 0


def test_router_client_backs_off_while_the_channel_cannot_be_opened():
    async def main():
        actor = FakeActor(("127.0.0.1", 9, TOKEN))  # nothing listens there: every open fails
        rr = RayRouter(actor, channel_retry_s=0.01)
        t_end = asyncio.get_running_loop().time() + 0.4
        n = 0
        while asyncio.get_running_loop().time() < t_end:
            assert await rr.route(_req(n)) == ("over ray", f"r{n}")  # Ray serves meanwhile
            n += 1
            await asyncio.sleep(0.002)
        return n, actor
    n, actor = asyncio.run(main())
    # 0.01 s doubling: about 6 tries in 0.4 s, not one per 10 ms (40)
    assert n > 50 and 3 <= actor.channel.calls <= 8, (n, actor.channel.calls)


def test_buffered_events_reach_the_router_before_the_next_decision():
    """A client's next call often comes less than flush_s after its last answer."""
    async def main():
        calls = Calls()
        server = await chan.serve(calls, "127.0.0.1", TOKEN)
        rr = RayRouter(FakeActor(("127.0.0.1", server.port, TOKEN)), flush_s=10.0)
        await rr.route(_req(0))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if rr._chan is not None:
                break
        rr.first_token("r0", 12.0)
        rr.finished("r0", True)
        await rr.route(_req(1))  # the flush timer (10 s) has not fired
        server.close()
        return calls
    seen = asyncio.run(main()).seen
    assert [m for m, _ in seen] == ["events", "route"]
    assert seen[0][1] == ([("first", "r0", 12.0), ("done", "r0", True)],)


def test_a_router_that_never_answers_times_out_to_ray():
    """Its node vanished without closing the connection: the call must not hang."""
    async def main():
        async def silent(reader, writer):
            try:
                await reader.read()  # takes everything, answers nothing
            finally:
                writer.close()
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ch = await chan.Channel.open("127.0.0.1", port, TOKEN)
        with pytest.raises(TimeoutError):
            await ch.call("route", _req(0), timeout_s=0.05)
        ch.close()
        actor = FakeActor(("127.0.0.1", port, TOKEN))
        rr = RayRouter(actor, channel_timeout_s=0.1)
        await rr.route(_req(1))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if rr._chan is not None:
                break
        t = asyncio.get_running_loop().time()
        out = await rr.route(_req(2))
        waited = asyncio.get_running_loop().time() - t
        server.close()
        await asyncio.sleep(0.01)
        return out, waited, rr
    out, waited, rr = asyncio.run(main())
    assert out == ("over ray", "r2") and 0.1 <= waited < 1.0
    assert rr.channel_lost == 1 and (rr._chan is None or rr._chan.closed)


def test_a_connection_closed_before_the_reader_noticed_is_a_closed_channel():
    async def main():
        _, server, actor, rr, _ = await _client_with_channel()
        ch = rr._chan
        ch._writer.close()  # gone under the caller, the reader not told yet (uvloop then raises on write)
        with pytest.raises(chan.ChannelClosed):
            ch.send("events", [])
        assert ch.closed
        ch2 = await chan.Channel.open("127.0.0.1", server.port, TOKEN)
        ch2._writer.close()
        with pytest.raises(chan.ChannelClosed):
            ch2.call("route", _req(1))
        rr._chan = ch2 = await chan.Channel.open("127.0.0.1", server.port, TOKEN)
        rr.finished("r1", True)  # a buffered event whose send finds the connection gone...
        ch2._writer.close()
        out = await rr.route(_req(2))  # ... and the call after it: both go over Ray, no error
        server.close()
        return out, actor
    out, actor = asyncio.run(main())
    assert out == ("over ray", "r2") and actor.events.calls == 1

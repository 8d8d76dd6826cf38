"""A wsproxy backend and client, written with the libraries wsproxy's own
Python suite uses (websockets >= 14, redis.asyncio): it checks what that
suite checks, against corerelay --wsproxy, and prints one JSON line of
results for the Rust test that runs it (tests/wsproxy.rs).

Usage: wsproxy.py HTTP_BASE WS_BASE REDIS_URL
"""

import asyncio
import json
import sys
import urllib.error
import urllib.request
import uuid

import redis.asyncio as aioredis
import websockets

HTTP, WS, REDIS = sys.argv[1], sys.argv[2], sys.argv[3]
WAIT = 5


def health():
    try:
        with urllib.request.urlopen(HTTP + "/health", timeout=WAIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def main():
    out = {}
    out["health"] = health()
    r = aioredis.from_url(REDIS)
    session, token = str(uuid.uuid4()), "tok-" + uuid.uuid4().hex
    await r.setex(f"session:{session}:auth", 60, token)
    url = f"{WS}/agent1/ws/{session}"

    # A wrong token is refused with 403.
    try:
        async with websockets.connect(url, additional_headers={"Authorization": "Bearer nope"}, open_timeout=WAIT):
            out["wrong_token"] = "accepted"
    except websockets.exceptions.InvalidStatus as e:
        out["wrong_token"] = e.response.status_code

    # No header: 401.
    try:
        async with websockets.connect(url, open_timeout=WAIT):
            out["no_token"] = "accepted"
    except websockets.exceptions.InvalidStatus as e:
        out["no_token"] = e.response.status_code

    pubsub = r.pubsub()
    await pubsub.subscribe(f"session:{session}:up")
    await pubsub.get_message(timeout=WAIT)  # the confirmation

    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=WAIT) as ws:
        # Redis -> WebSocket, published at once (wsproxy's suite sleeps
        # 100 ms first; corerelay needs no sleep).
        down = {"type": "data", "payload": "Hello from Redis!", "n": 1}
        out["receivers"] = await r.publish(f"session:{session}:down", json.dumps(down))
        out["down"] = json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == down

        # WebSocket -> Redis, verbatim.
        up = {"type": "ping", "counter": 1, "timestamp": "2026-11-30T00:00:00Z"}
        await ws.send(json.dumps(up))
        msg = None
        for _ in range(50):
            msg = await pubsub.get_message(timeout=WAIT / 50)
            if msg and msg["type"] == "message":
                break
        out["up"] = msg is not None and json.loads(msg["data"]) == up

        # Invalid JSON: an error answer, and the connection stays.
        await ws.send("not json")
        out["invalid"] = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        await r.publish(f"session:{session}:down", '{"still":"open"}')
        out["after_invalid"] = await asyncio.wait_for(ws.recv(), WAIT)
    await pubsub.aclose()
    await r.aclose()
    print(json.dumps(out))


asyncio.run(main())

"""The baseline for `corerelay-bench veltix-hub`: the hub Veltix users run
today, written with the Python library itself (veltix 3.3.0's README chat:
broadcast each message to every other client). Usage:
    python veltix_hub.py PORT
It prints "ready" once listening and serves until killed."""

import sys

from veltix import MessageType, Request, Server, ServerConfig

# Veltix drops frames of types it has not registered; the load tool sends 200.
BENCH = MessageType(200, "bench")

port = int(sys.argv[1])
server = Server(ServerConfig(host="127.0.0.1", port=port))


def on_recv(client, response):
    server.broadcast(Request(response.type, response.content), except_clients=[client])


server.on_recv(on_recv)
server.start()
print("ready", flush=True)
server.wait_until_closed()

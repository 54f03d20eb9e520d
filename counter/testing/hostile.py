"""Hostile requests: what an adversarial client sends (bad Upgrade/CONNECT,
garbage, huge ids, odd methods, requests cut off). Used by the tests and by
the fault suite's `upgrade_storm`; loopback only."""

import socket


def status_codes(received):
    """The status codes of the HTTP answers in `received`."""
    return [int(line.split()[1]) for line in received.split(b"\r\n") if line.startswith(b"HTTP/1.")]


ATTACKER = 777  # the only banner id attacks name; a 2xx to a GET of it is a counted click

ATTACKS = [
    b"GET /counter/777 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n",
    b"GET /counter/777 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
    b"CONNECT /counter/777 HTTP/1.1\r\nHost: x\r\n\r\n",
    # websocket without its key: meinheld's other Upgrade branch
    b"GET /counter/777 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
]


def attack(port, raw, wait=2.0):
    """Send one hostile request on a connection of its own; the status codes of
    what came back before the peer closed, went quiet, or finished an answer
    with a Content-Length (granian keeps an upgraded request's connection)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    received = b""
    try:
        sock.sendall(raw)
        while not answered(received):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except OSError:  # reset, timed out, or it closed before reading all we sent
        pass
    finally:
        sock.close()
    return status_codes(received)


def answered(received):
    head, sep, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if sep and line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def hostile_requests(rng):
    """Endless (raw request, seconds to wait for an answer, whether a 2xx
    answer means a counted click of ATTACKER)."""
    while True:
        kind = rng.randrange(6)
        if kind == 0:
            raw = rng.choice(ATTACKS)
        elif kind == 1:  # random garbage, sometimes with an HTTP-looking end
            junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            raw = junk + rng.choice([b"", b"\r\n\r\n", b" HTTP/1.1\r\n\r\n"])
        elif kind == 2:  # huge ids: past int64, past meinheld's 8 KiB path limit
            digits = rng.choice([20, 40, 9000, 20000])
            raw = b"GET /counter/" + b"9" * digits + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        elif kind == 3:  # odd methods on the click route
            method = rng.choice([b"PROPFIND", b"BREW", b"get", b"TRACE", b"DELETE", b"PATCH",
                                 b"M-SEARCH", b"OPTIONS", b"PUT", b"X" * 200])
            raw = method + b" /counter/777 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        elif kind == 4:  # bad versions, bad header names, NULs
            raw = rng.choice([
                b"GET /counter/777 HTTP/9.9\r\nHost: x\r\n\r\n",
                b"GET /counter/777 HTTP/1.1\r\nHo st: x\r\n\r\n",
                b"GET /counter/777 HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
                b"GET /counter/\x00777 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /counter/777 HTTP/1.1\r\n\xff\xfe: \xff\r\n\r\n",
                b"GET /counter/777\r\n\r\n",
            ])
        else:  # cut off mid-headers: no answer comes, the attacker gives up
            yield b"GET /counter/777 HTTP/1.1\r\nHost: x\r\nUpgrade: h2", 0.05, False
            continue
        yield raw, 2.0, raw.startswith(b"GET /counter/777")

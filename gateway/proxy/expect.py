"""``Expect: 100-continue`` on the proxy listener (RFC 9110 §10.1.1).

A client that sends it holds its body back until the server answers ``100 Continue`` (curl
gives up waiting after 1 s and sends anyway; others wait longer). keygate asks for the body
once the request is authorised, just before it reads it (to forward it, or to find the
resource a restricted key names in it), so a refused request costs the client no upload:
its refusal is final, says ``Connection: close``, and the connection closes as soon as the
answer is out rather than waiting for a body that will not come.

Which requests wait is known to their connection (gateway/listener.py): those whose head
said so and whose body had not started when the head was read. The ``Expect`` header itself
is hop-by-hop (gateway/proxy/headers.py): the upstream never sees it.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway.listener import ClientConnection

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


async def send_continue(request: web.BaseRequest) -> None:
    """Ask for the body of ``request`` if its client waits to be asked; else nothing."""
    protocol = request.protocol
    if type(protocol) is not ClientConnection or protocol.continue_for is not request.content:
        return
    protocol.body_requested()
    writer = request.writer
    await writer.write(CONTINUE)
    writer.output_size = 0  # an interim answer: the response proper has not started


def close_if_body_withheld(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``response`` answers a request whose client still holds its body back: the
    connection closes once it is out (announced with ``Connection: close``)."""
    protocol = request.protocol
    if type(protocol) is not ClientConnection or protocol.continue_for is not request.content:
        return
    response.force_close()
    protocol.body_refused()

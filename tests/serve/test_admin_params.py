"""POST /admin/drain without ?replica= says none was given (it said "not None"); a bad
one is quoted. The check runs before the engine is asked (no engine here)."""

import asyncio

import pytest
from starlette.requests import Request

from llamadist.serve.app import Server, ServeConfig
from llamadist.serve.protocol import ApiError


def admin(query: bytes, what: str = "drain") -> ApiError:
    server = Server(None, None, ServeConfig("m"))
    request = Request({"type": "http", "method": "POST", "path": f"/admin/{what}",
                       "query_string": query, "headers": []})
    with pytest.raises(ApiError) as info:
        asyncio.run(server.admin(request, what))
    assert info.value.status == 400 and info.value.param == "replica"
    return info.value


def test_a_missing_replica_is_said_to_be_missing():
    msg = admin(b"").message
    assert "none was given" in msg and "None" not in msg
    assert "undrain as ?replica=K" in admin(b"kv=auto", "undrain").message


def test_a_bad_replica_is_quoted():
    assert "not 'x'" in admin(b"replica=x").message


@pytest.mark.parametrize("given", ["1_0", "%201%20", "%D9%A1", "-1", "1.0"])
def test_only_plain_digits_name_a_replica(given):
    """int() takes "1_0" (10), " 1 " and other scripts' digits: a typo must not drain
    another replica."""
    assert "?replica=K" in admin(f"replica={given}".encode()).message


@pytest.mark.parametrize("origin, status", [(b"http://evil.example", 403),
                                            (b"http://127.0.0.1:8000", 400)])
def test_another_site_s_page_cannot_drain(origin, status):
    """A page of another site that POSTs /admin/drain from the user's browser (no key
    needed on a keyless server) is refused before anything else; the server's own origin
    goes on to the replica check."""
    server = Server(None, None, ServeConfig("m"))
    request = Request({"type": "http", "method": "POST", "path": "/admin/drain",
                       "query_string": b"", "headers": [(b"origin", origin),
                                                       (b"host", b"127.0.0.1:8000")]})
    with pytest.raises(ApiError) as info:
        asyncio.run(server.admin(request, "drain"))
    assert info.value.status == status

"""The demo shop's account section: a login form with a CSRF token, then order pages behind a session cookie.

For the login-then-scrape example (``spiders/orders.py``). ``GET /account/login``
serves a form whose hidden ``csrf_token`` matches a ``demo_csrf`` cookie; ``POST
/account/login`` checks both and the demo credentials, sets a ``demo_session``
cookie and redirects to ``/account/orders``. Order pages without a valid session
redirect to the login form. Orders are derived from SHA-256 of their id, like
the products.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import date, timedelta
from html import escape

from aiohttp import web

__all__ = [
    "DEMO_PASSWORD",
    "DEMO_USER",
    "ORDERS_PAGE_SIZE",
    "ORDER_COUNT",
    "Order",
    "add_account_routes",
    "order",
]

DEMO_USER = "demo"
DEMO_PASSWORD = "trawl-demo"  # a demo site's published password, not a secret
ORDER_COUNT = 45
ORDERS_PAGE_SIZE = 20
_ORDER_PAGES = -(-ORDER_COUNT // ORDERS_PAGE_SIZE)
_STATUSES = ("placed", "paid", "shipped", "delivered", "returned")
_CSRF_COOKIE = "demo_csrf"
_SESSION_COOKIE = "demo_session"
_SESSIONS: web.AppKey[set[str]] = web.AppKey("account_sessions", set)


@dataclass(frozen=True, slots=True)
class Order:
    """One order of the demo account, as its row shows it."""

    id: int
    number: str
    placed: date
    status: str
    total: float
    items: int


def order(i: int) -> Order:
    """The order with id ``i`` (1..ORDER_COUNT)."""
    if not 1 <= i <= ORDER_COUNT:
        raise ValueError(f"order id {i} out of range 1..{ORDER_COUNT}")
    h = hashlib.sha256(f"order:{i}".encode("ascii")).digest()
    return Order(
        id=i,
        number=f"ORD-{i:06d}",
        placed=date(2024, 1, 1) + timedelta(days=int.from_bytes(h[0:2], "big") % 700),
        status=_STATUSES[h[2] % len(_STATUSES)],
        total=round((500 + int.from_bytes(h[3:6], "big") % 200_000) / 100, 2),
        items=1 + h[6] % 9,
    )


def _page(title: str, body: str) -> web.Response:
    html = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)} | Trawl Demo Shop</title>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8")


async def _login_form(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(16)
    resp = _page(
        "Sign in",
        "<h1>Sign in</h1>\n"
        '<form id="login" method="post" action="/account/login">\n'
        f'<input type="hidden" name="csrf_token" value="{token}">\n'
        '<label>User <input type="text" name="username"></label>\n'
        '<label>Password <input type="password" name="password"></label>\n'
        '<button type="submit">Sign in</button>\n</form>',
    )
    resp.set_cookie(_CSRF_COOKIE, token, httponly=True, samesite="Strict")
    return resp


async def _login(request: web.Request) -> web.Response:
    form = await request.post()
    sent, expected = str(form.get("csrf_token", "")), request.cookies.get(_CSRF_COOKIE, "")
    if not expected or not hmac.compare_digest(sent, expected):
        return web.Response(status=403, text="invalid CSRF token", content_type="text/plain")
    user, password = str(form.get("username", "")), str(form.get("password", ""))
    if not (hmac.compare_digest(user, DEMO_USER) and hmac.compare_digest(password, DEMO_PASSWORD)):
        return web.Response(status=403, text="wrong user or password", content_type="text/plain")
    session = secrets.token_urlsafe(24)
    request.app[_SESSIONS].add(session)
    resp = web.Response(status=302, headers={"Location": "/account/orders"})
    resp.set_cookie(_SESSION_COOKIE, session, httponly=True, samesite="Lax")
    resp.del_cookie(_CSRF_COOKIE)
    return resp


def _signed_in(request: web.Request) -> bool:
    return request.cookies.get(_SESSION_COOKIE, "") in request.app[_SESSIONS]


async def _orders(request: web.Request) -> web.Response:
    if not _signed_in(request):
        raise web.HTTPFound("/account/login")
    try:
        n = int(request.query.get("page", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="page must be a number") from None
    if not 1 <= n <= _ORDER_PAGES:
        raise web.HTTPNotFound(text="no such page")
    first, last = (n - 1) * ORDERS_PAGE_SIZE + 1, min(n * ORDERS_PAGE_SIZE, ORDER_COUNT)
    rows = ['<table class="orders">']
    for i in range(first, last + 1):
        o = order(i)
        rows.append(
            f'<tr class="order"><td class="number">{o.number}</td><td class="placed">{o.placed.isoformat()}</td>'
            f'<td class="status">{o.status}</td><td class="total" data-amount="{o.total:.2f}">{o.total:,.2f}</td>'
            f'<td class="items">{o.items}</td></tr>'
        )
    rows.append("</table>")
    if n < _ORDER_PAGES:
        rows.append(f'<a rel="next" class="next" href="/account/orders?page={n + 1}">Next</a>')
    return _page(f"Your orders, page {n}", f"<h1>Your orders</h1>\n{''.join(rows)}")


def add_account_routes(app: web.Application) -> None:
    """Mount the account section on the demo app."""
    app[_SESSIONS] = set()
    app.router.add_get("/account/login", _login_form)
    app.router.add_post("/account/login", _login)
    app.router.add_get("/account/orders", _orders)

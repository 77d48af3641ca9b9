"""The dashboard's access rules and actions over real loopback HTTP (no browser)."""

from __future__ import annotations

import http.client
import re
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from ..pg import query
from .dashboard import TOKEN, running, seed


def call(base: str, method: str, path: str, *, form: dict[str, str] | None = None,
         cookie: str | None = None) -> tuple[int, dict[str, str], str]:
    """One request, redirects not followed: (status, headers, body)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    headers = {}
    body = None
    if form is not None:
        body = urlencode(form)
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie:
        headers["Cookie"] = cookie
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def login(base: str) -> tuple[str, str]:
    """Log in; returns (the cookie to send, the page's CSRF token)."""
    status, headers, _ = call(base, "POST", "/ui/login", form={"token": TOKEN})
    assert status == 303 and headers["location"] == "/ui"
    cookie = headers["set-cookie"].split(";")[0]
    status, _, page = call(base, "GET", "/ui", cookie=cookie)
    assert status == 200
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return cookie, match.group(1)


def test_without_a_token_the_dashboard_does_not_exist(db_url: str, tmp_path: Path) -> None:
    seed(db_url)
    with running(db_url, tmp_path, 3, SPECTRAL_DETAIL_TOKEN="") as (_, base):
        assert call(base, "GET", "/ui")[0] == 404
        assert call(base, "GET", "/ui/login")[0] == 404
        assert call(base, "POST", "/ui/login", form={"token": TOKEN})[0] == 404


def test_login_sets_a_strict_http_only_session_and_a_wrong_token_gets_401(
    db_url: str, tmp_path: Path
) -> None:
    seed(db_url)
    with running(db_url, tmp_path, 3, SPECTRAL_UI_SESSION_TTL="2") as (_, base):
        status, headers, _ = call(base, "GET", "/ui")
        assert (status, headers["location"]) == (303, "/ui/login")
        status, headers, page = call(base, "POST", "/ui/login", form={"token": "not-the-token-at-all"})
        assert status == 401 and "set-cookie" not in headers and "wrong token" in page
        status, headers, _ = call(base, "POST", "/ui/login", form={"token": TOKEN})
        assert status == 303
        attributes = [a.strip().lower() for a in headers["set-cookie"].split(";")]
        assert "httponly" in attributes and "samesite=strict" in attributes and "path=/ui" in attributes
        cookie = headers["set-cookie"].split(";")[0]
        status, headers, page = call(base, "GET", "/ui", cookie=cookie)
        assert status == 200 and "frame-ancestors 'none'" in headers["content-security-policy"]
        # Stored text is escaped, never markup.
        assert "&lt;b&gt;Connection unexpectedly closed&lt;/b&gt;" in page and "<b>Connection" not in page
        time.sleep(2.5)
        status, headers, _ = call(base, "GET", "/ui", cookie=cookie)
        assert (status, headers["location"]) == (303, "/ui/login"), "the session did not expire"


def test_actions_need_the_pages_csrf_token_and_change_nothing_without_it(
    db_url: str, tmp_path: Path
) -> None:
    seeded = seed(db_url)
    victim = seeded.other_dead_id
    with running(db_url, tmp_path, 3) as (proc, base):
        cookie, csrf = login(base)
        for form in ({"id": str(victim)}, {"id": str(victim), "csrf": "forged-" + csrf[:10]}):
            status, _, page = call(base, "POST", "/ui/requeue", form=form, cookie=cookie)
            assert status == 403 and "CSRF" in page
        assert call(base, "POST", "/ui/reconcile", form={"state": "off"}, cookie=cookie)[0] == 403
        assert call(base, "POST", "/ui/requeue", form={"id": str(victim), "csrf": csrf})[0] == 403
        assert query(db_url, "SELECT status FROM core.outbox WHERE id = $1", victim)[0]["status"] == "DEAD"
        assert query(db_url, "SELECT count(*) AS n FROM core.settings WHERE key = 'reconcile_enabled'"
                     )[0]["n"] == 0

        status, headers, _ = call(base, "POST", "/ui/reconcile", form={"state": "off", "csrf": csrf},
                                  cookie=cookie)
        assert (status, headers["location"]) == (303, "/ui")
        assert query(db_url, "SELECT value FROM core.settings WHERE key = 'reconcile_enabled'"
                     )[0]["value"] == "false"
        proc.wait_for("ui action: reconciler switched off (override was default)")

        status, _, _ = call(base, "POST", "/ui/requeue-topic",
                            form={"topic": "billing.invoice.created", "csrf": csrf}, cookie=cookie)
        assert status == 303
        assert query(db_url, "SELECT status FROM core.outbox WHERE id = $1", victim)[0]["status"] == "PENDING"
        proc.wait_for(f"ui action: requeued 1 DEAD events of topic billing.invoice.created: {victim}")
        _, _, page = call(base, "GET", "/ui", cookie=cookie)
        assert f"requeued 1 DEAD events of topic billing.invoice.created: {victim}" in page

        status, _, page = call(base, "POST", "/ui/requeue", form={"id": "x1", "csrf": csrf}, cookie=cookie)
        assert status == 400


def test_the_dashboard_lists_keys_a_dead_event_blocks_with_their_head(
    db_url: str, tmp_path: Path
) -> None:
    seed(db_url)
    [head] = query(db_url, "INSERT INTO core.outbox (generation, topic, payload, status, attempts,"
                           " dead_reason, key) VALUES (2, 'billing.invoice.created', '{}', 'DEAD', 3,"
                           " 'failed 3 of 3 attempts', 'order-<42>') RETURNING id")
    query(db_url, "INSERT INTO core.outbox (generation, topic, payload, key) SELECT 2,"
                  " 'billing.invoice.created', '{}', 'order-<42>' FROM generate_series(1, 2)")
    with running(db_url, tmp_path, 3) as (_, base):
        cookie, _ = login(base)
        _, _, page = call(base, "GET", "/ui", cookie=cookie)
    row = re.search(r'<tr data-blocked-key="order-&lt;42&gt;">(.*?)</tr>', page, re.S)
    assert row, page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert cells == ["order-&lt;42&gt;", str(head["id"]), "billing.invoice.created", "2", "2",
                     "failed 3 of 3 attempts"]


def test_the_dashboard_shows_the_table_health_verdicts(db_url: str, tmp_path: Path) -> None:
    seed(db_url)
    with running(db_url, tmp_path, 3) as (_, base):
        cookie, _ = login(base)
        _, _, page = call(base, "GET", "/ui", cookie=cookie)
    health = re.findall(r'<li class="(ok|bad)" data-health="([a-z_]+)">[^ ]+ ([^<]*)</li>', page)
    assert [(cls, name) for cls, name, _ in health] == [
        ("ok", "xmin_horizon"), ("ok", "table_ok"), ("ok", "table_ok")], page
    assert sorted(text.split(":")[0] for _, _, text in health[1:]) == [
        "core.event_handled", "core.outbox"]

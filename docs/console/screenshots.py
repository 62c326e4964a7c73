"""
The README's screenshots of the web console: starts the real daemon on
fresh ports with an aiosmtpd smarthost, fills it with demo users and mail,
and saves each page at desktop and phone width as docs/console/*.png.

    .venv/bin/python docs/console/screenshots.py

Needs Debian's Chromium (/usr/bin/chromium) and the test extra (Playwright).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from tests.harness.clients import logged_in, submit  # noqa: E402
from tests.harness.daemon import Daemon  # noqa: E402
from tests.harness.messages import message, queue_id  # noqa: E402
from tests.harness.polling import poll  # noqa: E402
from tests.test_console_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, LOADED, PAGES, PHONE  # noqa: E402

USERS = [
    ("wordpress-shop", 2, "shop.example", "Web shop order mails. Owner: Dana (ext. 214)"),
    ("crm-newsletter", 4, "news.example", "Monthly newsletter, bulk"),
    ("alerts", 1, "ops.example", "Monitoring alerts: keep at priority 1"),
]
PHONE_PAGES = ("users", "messages", "statistics")


def demo_mail(daemon: Daemon) -> None:
    """Users and a little traffic: sent, bounced, deferred, scheduled and refused mail."""
    later = ['X-SMTPAPI: {"Schedule": "2099-01-01T00:00:00Z"}']
    for username, priority, domain, notes in USERS:
        _, password = daemon.create_user(username=username, priority=priority, authorized_domains=domain, notes=notes)
        client = logged_in(daemon.plain_ports[0], username, password)
        try:
            sender = f"noreply@{domain}"
            for n in range({"alerts": 2, "wordpress-shop": 5}.get(username, 3)):
                queue_id(
                    submit(client, sender, [f"customer{n}@dest.test"], message(f"Order {1000 + n} shipped", sender))
                )
            submit(client, sender, ["bounce-nobody@dest.test", "ok@dest.test"], message("Your invoice", sender))
            submit(client, sender, ["defer-full@dest.test"], message("Password reset", sender))
            submit(client, sender, ["later@dest.test"], message("Spring sale", sender, headers=later))
            client.mail("someone@elsewhere.example")
            client.rset()
        finally:
            client.quit()
    daemon.create_user(username="legacy-app", authorized_domains="old.example", notes="Retired in March")
    daemon.api("PATCH", "/api/v1/users/legacy-app", {"enabled": False})
    poll(lambda: not daemon.api("GET", "/api/v1/messages?status=queued").json["messages"], 20)


def shoot(page: Page, name: str, width: int) -> None:
    path = os.path.join(HERE, f"{name}-{width}.png")
    page.screenshot(path=path, full_page=True)
    print(path)


def main() -> None:
    daemon = Daemon(lambda d: d.toml(hostname="smtp.example.net"), plain=1, tls=1)
    try:
        demo_mail(daemon)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=DESKTOP)
            page.goto(f"http://127.0.0.1:{daemon.admin_port}/")
            expect(page.get_by_label("Admin token")).to_be_visible()
            shoot(page, "sign-in", DESKTOP["width"])
            page.get_by_label("Admin token").fill(daemon.token)
            page.get_by_role("button", name="Sign in").click()
            form = page.get_by_role("form", name="Create a user")
            form.get_by_label("Username (empty: generated)").fill("outlook-frontdesk")
            form.get_by_label("Authorized senders (separated by ;)").fill("frontdesk@hotel.example")
            form.get_by_label("Notes").fill("Front desk PC, Outlook 365")
            form.get_by_role("button", name="Create user").click()
            expect(page.get_by_role("region", name="One-time password")).to_be_visible()
            for viewport in (DESKTOP, PHONE):
                page.set_viewport_size(viewport)
                for name in PAGES:
                    if viewport is PHONE and name not in PHONE_PAGES:
                        continue
                    if name != "users" or viewport is PHONE:
                        page.get_by_role("link", name=PAGES[name], exact=True).click()
                    expect(page.locator(LOADED[name]).first).to_be_attached()
                    if name == "messages":
                        invoice = page.get_by_role("row").filter(has_text="Your invoice").first
                        invoice.get_by_role("button").click()
                        expect(page.get_by_role("table", name="Recipients")).to_be_visible()
                    if name == "statistics":
                        page.get_by_label("Group by").select_option("user")
                        page.get_by_role("button", name="Show").click()
                        expect(page.get_by_role("img", name="Bar chart by user")).to_be_visible()
                    shoot(page, name, viewport["width"])
            browser.close()
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()

"""
The web console in a real browser (contract section 7): Debian's Chromium,
headless, driven by Playwright against the real twistd with a smarthost.
Elements are found by role and label, as a screen reader finds them.  One
daemon and one browser serve the whole module; each test has its own
browser context (its own cookies).  A failing test leaves a screenshot in
its trial temp directory.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import smtplib
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon, Shared
from tests.harness.messages import message, queue_id
from tests.harness.polling import poll

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
PAGES = {
    "users": "Users",
    "settings": "Client settings",
    "messages": "Messages",
    "queue": "Queue",
    "notifications": "Notifications",
    "statistics": "Statistics",
}
# What each page shows once its data has arrived.
LOADED = {
    "users": "#users-table tbody tr",
    "settings": "#settings-list dt",
    "messages": "#messages-table tbody tr",
    "queue": "#queue-table tbody tr",
    "notifications": "#notifications-table tbody tr",
    "statistics": "#statistics-chart > *",
}
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
TIMEOUT_MS = 10_000

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None


def _daemon() -> Daemon:
    return Daemon(lambda d: d.toml(), plain=1, tls=0)


_shared_daemon = Shared(_daemon)


class _Browser:
    """One headless Chromium for the module, closed when the test run ends."""

    def __init__(self) -> None:
        self._playwright: Any = None
        self._browser: Browser | None = None

    def get(self) -> Browser:
        if self._browser is None:
            self._playwright = sync_playwright().start()
            self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            atexit.register(self.close)
        return self._browser

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
            self._playwright.stop()
            self._browser = None


_shared_browser = _Browser()


def screenshot_on_failure(test: Callable[..., None]) -> Callable[..., None]:
    """Save the page as C{failure.png} in the test's temp directory when C{test} fails."""

    @functools.wraps(test)
    def run(self: ConsoleBrowserTests) -> None:
        try:
            test(self)
        except BaseException:
            path = os.path.abspath(self.mktemp() + "-failure.png")
            self.page.screenshot(path=path, full_page=True)
            print(f"screenshot of the failure: {path}")
            raise

    return run


def smtp_login(daemon: Daemon, username: str, password: str) -> bool:
    """Whether SMTP AUTH (after STARTTLS) with these credentials succeeds."""
    try:
        logged_in(daemon.plain_ports[0], username, password).quit()
    except smtplib.SMTPAuthenticationError:
        return False
    return True


def serious_violations(axe: Any, page: Page) -> list[str]:
    """The ids of the serious and critical axe-core violations on the page, with the elements they concern."""
    violations = axe.run(page).response["violations"]
    return [
        f"{v['id']}: {[node['target'] for node in v['nodes']]}"
        for v in violations
        if v["impact"] in ("serious", "critical")
    ]


class ConsoleBrowserTests(TestCase):
    """The console's pages, signed in with the admin token, in Chromium."""

    def setUp(self) -> None:
        if sync_playwright is None:
            raise SkipTest("Playwright for Python is not installed (pip install -e '.[test]')")
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)")
        self.daemon = _shared_daemon.get()
        self.base = f"http://127.0.0.1:{self.daemon.admin_port}"
        self.context = _shared_browser.get().new_context(viewport=DESKTOP)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.addCleanup(self.context.close)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.page.on("dialog", self._dialog)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _dialog(self, dialog: Any) -> None:
        # The console asks before destructive actions with confirm(); an
        # alert() would be injected script running.
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()

    def sign_in(self, token: str | None = None) -> Page:
        page = self.page
        page.goto(self.base + "/")
        page.get_by_label("Admin token").fill(token or self.daemon.token)
        page.get_by_role("button", name="Sign in").click()
        return page

    def go(self, name: str) -> Page:
        self.page.get_by_role("link", name=PAGES[name], exact=True).click()
        expect(self.page.get_by_role("heading", name=PAGES[name], level=1)).to_be_visible()
        return self.page

    @screenshot_on_failure
    def test_sign_in_and_out(self) -> None:
        """
        A wrong token is refused and sets no cookie; the right one opens the
        Users page and keeps no token in page storage; a reload keeps the
        session; navigating moves the focus to the new page's heading; and
        sign-out ends the session.
        """
        page = self.sign_in("wrong-token")
        expect(page.get_by_role("alert")).to_have_text("Wrong admin token.")
        self.assertEqual(self.context.cookies(), [])
        page.get_by_label("Admin token").fill(self.daemon.token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Users", level=1)).to_be_visible()
        (cookie,) = self.context.cookies()
        self.assertEqual((cookie["httpOnly"], cookie["sameSite"]), (True, "Strict"))
        self.assertNotIn(
            self.daemon.token, json.dumps(page.evaluate("[document.cookie, {...localStorage}, {...sessionStorage}]"))
        )
        page.reload()
        expect(page.get_by_role("heading", name="Users", level=1)).to_be_visible()
        self.go("queue")
        expect(page.get_by_role("heading", name="Queue", level=1)).to_be_focused()
        expect(page.get_by_role("link", name="Queue")).to_have_attribute("aria-current", "page")
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        page.reload()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        self.assertEqual(self.errors, [])

    @screenshot_on_failure
    def test_user_lifecycle(self) -> None:
        """
        Create a user (its password shown once, gone after a reload), whose
        note with markup shows as text; disable it and SMTP AUTH fails;
        enable it and regenerate the password: the old one fails, the new
        one works.
        """
        page = self.sign_in()
        form = page.get_by_role("form", name="Create a user")
        form.get_by_label("Username (empty: generated)").fill("browser-user")
        form.get_by_label("Priority").select_option("2")
        form.get_by_label("Authorized domains (separated by ;)").fill("allowed.test; other.test")
        form.get_by_label("Notes").fill(XSS)
        form.get_by_role("button", name="Create user").click()
        panel = page.get_by_role("region", name="One-time password")
        expect(panel).to_be_visible()
        password = panel.locator("code").text_content()
        self.assertGreaterEqual(len(password), 16)
        self.assertTrue(smtp_login(self.daemon, "browser-user", password))

        table = page.get_by_role("table", name="SMTP users")
        user_row = table.get_by_role("row").filter(has_text="browser-user")
        expect(user_row.get_by_role("cell").nth(5)).to_have_text(XSS)
        expect(user_row.get_by_role("cell").nth(3)).to_have_text("allowed.test; other.test")
        self.assertEqual(table.locator("img, script").count(), 0)

        page.reload()
        expect(
            page.get_by_role("table", name="SMTP users").get_by_role("row").filter(has_text="browser-user")
        ).to_be_visible()
        expect(page.get_by_role("region", name="One-time password")).to_be_hidden()
        self.assertNotIn(password, page.content())

        page.get_by_role("button", name="Edit browser-user").click()
        edit = page.get_by_role("form", name="Edit user browser-user")
        edit.get_by_label("Enabled (may log in and send)").uncheck()
        edit.get_by_label("Notes").fill("paused by the test")
        edit.get_by_role("button", name="Save changes").click()
        user_row = page.get_by_role("table", name="SMTP users").get_by_role("row").filter(has_text="browser-user")
        expect(user_row.get_by_role("cell").nth(1)).to_have_text("disabled")
        self.assertFalse(smtp_login(self.daemon, "browser-user", password))

        page.get_by_label("Show").select_option("enabled")
        expect(
            page.get_by_role("table", name="SMTP users").get_by_role("row").filter(has_text="browser-user")
        ).to_have_count(0)
        page.get_by_label("Show").select_option("")

        page.get_by_role("button", name="Edit browser-user").click()
        edit.get_by_label("Enabled (may log in and send)").check()
        edit.get_by_label("Budget: messages an hour at level 1 (0: no limit)").fill("25")
        edit.get_by_label("Sandbox (accepted, never relayed)").check()
        edit.get_by_role("button", name="Save changes").click()
        expect(user_row.get_by_role("cell").nth(1)).to_have_text("enabled, sandbox")
        stored = self.daemon.api("GET", "/api/v1/users/browser-user").json
        self.assertEqual((stored["priority_budget"], stored["sandbox"]), (25, True))
        page.get_by_role("button", name="Edit browser-user").click()
        edit.get_by_label("Sandbox (accepted, never relayed)").uncheck()
        edit.get_by_role("button", name="Save changes").click()
        expect(user_row.get_by_role("cell").nth(1)).to_have_text("enabled")
        page.get_by_role("button", name="Edit browser-user").click()
        edit.get_by_role("button", name="Regenerate password").click()
        expect(panel).to_be_visible()
        new_password = panel.locator("code").text_content()
        self.assertNotEqual(new_password, password)
        self.assertFalse(smtp_login(self.daemon, "browser-user", password))
        self.assertTrue(smtp_login(self.daemon, "browser-user", new_password))
        self.assertEqual([d.split(":")[0] for d in self.dialogs], ["confirm"])
        self.assertEqual(self.errors, [])

    @screenshot_on_failure
    def test_messages(self) -> None:
        """
        A message sent over SMTP shows in Messages with each recipient's
        status; a scheduled one is retried and another deleted from its
        detail.
        """
        username, password = self.daemon.create_user(username="msg-user", authorized_domains="allowed.test")
        client = logged_in(self.daemon.plain_ports[0], username, password)
        try:
            sent_id = queue_id(
                submit(
                    client,
                    "a@allowed.test",
                    ["ok@dest.test", "bounce-me@dest.test"],
                    message("Console <b>subject</b>", "a@allowed.test"),
                )
            )
            later = ['X-SMTPAPI: {"Schedule": "2099-01-01T00:00:00Z"}']
            retry_id = queue_id(
                submit(client, "a@allowed.test", ["later@dest.test"], message("retry me", headers=later))
            )
            delete_id = queue_id(
                submit(client, "a@allowed.test", ["later@dest.test"], message("drop me", headers=later))
            )
        finally:
            client.quit()
        poll(lambda: self.daemon.api("GET", f"/api/v1/messages/{sent_id}").json["status"] == "partial", 20)

        page = self.sign_in()
        self.go("messages")
        search = page.get_by_role("search", name="Messages")
        search.get_by_label("User").fill(username)
        search.get_by_role("button", name="Search").click()
        table = page.get_by_role("table", name="Messages, newest first")
        # The bounce (DSN) of bounce-me@ is queued under the user too.
        for message_id in (sent_id, retry_id, delete_id):
            expect(table.get_by_role("row").filter(has_text=message_id)).to_have_count(1)
        expect(table.get_by_role("row").filter(has_text=sent_id)).to_contain_text("Console <b>subject</b>")
        page.get_by_role("button", name=f"Details of message {sent_id}").click()
        recipients = page.get_by_role("table", name="Recipients")
        expect(recipients.get_by_role("row").filter(has_text="ok@dest.test")).to_contain_text("sent")
        expect(recipients.get_by_role("row").filter(has_text="bounce-me@dest.test")).to_contain_text("bounced")
        expect(recipients.get_by_role("row").filter(has_text="bounce-me@dest.test")).to_contain_text("550")

        # Each button is the one of the details shown for that message:
        # clicked before they replace the previous ones, it would act on
        # the message shown before.
        page.get_by_role("region", name=f"Message {sent_id}").get_by_role("button", name="Retry now").click()
        expect(page.get_by_role("status")).to_contain_text("Error:")

        page.get_by_role("button", name=f"Details of message {delete_id}").click()
        page.get_by_role("region", name=f"Message {delete_id}").get_by_role("button", name="Delete message").click()
        expect(page.get_by_role("status")).to_have_text(f"Message {delete_id} deleted.")
        expect(page.get_by_role("region", name=f"Message {delete_id}").get_by_role("definition").first).to_have_text(
            "deleted"
        )
        self.assertEqual(self.daemon.api("GET", f"/api/v1/messages/{delete_id}").json["status"], "deleted")

        page.get_by_role("button", name=f"Details of message {retry_id}").click()
        page.get_by_role("region", name=f"Message {retry_id}").get_by_role("button", name="Retry now").click()
        expect(page.get_by_role("status")).to_have_text(f"Message {retry_id} will be tried now.")
        poll(lambda: self.daemon.api("GET", f"/api/v1/messages/{retry_id}").json["status"] == "sent", 20)
        self.assertEqual(self.errors, [])

    @screenshot_on_failure
    def test_statistics_chart(self) -> None:
        """The chart has one bar per group the API answers: per day present, three days drawn as three bars."""
        username, password = self.daemon.create_user(authorized_domains="allowed.test")
        client = logged_in(self.daemon.plain_ports[0], username, password)
        try:
            queue_id(submit(client, "a@allowed.test", ["ok@dest.test"], message("counted")))
        finally:
            client.quit()
        page = self.sign_in()
        self.go("statistics")
        page.get_by_label("Group by").select_option("day")
        page.get_by_role("button", name="Show").click()
        groups = self.daemon.api("GET", "/api/v1/stats?policy=day").json["groups"]
        self.assertGreaterEqual(len(groups), 1)
        expect(page.get_by_role("img", name="Bar chart by day")).to_be_visible()
        expect(page.locator("#statistics-chart rect.bar")).to_have_count(len(groups))

        days = [
            {"key": key, "messages": n, "recipients": n, "sent": n - 1, "deferred": 0, "bounced": 1, "rejected": 0}
            for key, n in (("2026-11-28", 4), ("2026-11-29", 9), ("2026-11-30", 2))
        ]
        page.route("**/api/v1/stats?*", lambda route: route.fulfill(json={"policy": "day", "groups": days}))
        page.get_by_role("button", name="Show").click()
        bars = page.locator("#statistics-chart rect.bar")
        expect(bars).to_have_count(3)
        self.assertEqual([bars.nth(i).get_attribute("data-key") for i in range(3)], [d["key"] for d in days])
        heights = [float(bars.nth(i).get_attribute("height")) for i in range(3)]
        self.assertEqual(sorted(range(3), key=heights.__getitem__), [2, 0, 1])
        expect(page.get_by_role("table", name="Statistics by day").get_by_role("row")).to_have_count(4)

    @screenshot_on_failure
    def test_csrf_and_headers(self) -> None:
        """
        In the signed-in browser, a write without the CSRF token is refused
        (403) and changes nothing; the page runs under its CSP and refuses
        to be framed.
        """
        page = self.sign_in()
        expect(page.get_by_role("heading", name="Users", level=1)).to_be_visible()
        status = page.evaluate(
            """async () => (await fetch('/api/v1/users', {method: 'POST', headers: {'Content-Type':
            'application/json'}, body: JSON.stringify({username: 'csrf-victim'})})).status"""
        )
        self.assertEqual(status, 403)
        self.assertEqual(self.daemon.api("GET", "/api/v1/users/csrf-victim").status, 404)
        response = page.request.get(self.base + "/")
        self.assertEqual(response.headers["x-frame-options"], "DENY")
        self.assertIn("script-src 'self'", response.headers["content-security-policy"])
        injected = page.evaluate(
            """() => { const s = document.createElement('script'); s.textContent = 'window.ran = 1';
            document.body.append(s); return window.ran === 1; }"""
        )
        self.assertFalse(injected, "an inline script ran despite the CSP")

    @screenshot_on_failure
    def test_accessibility(self) -> None:
        """
        axe-core finds no serious or critical violation on any page, at
        desktop and phone width, and no page scrolls sideways on a phone.
        """
        from axe_playwright_python.sync_playwright import Axe

        axe = Axe()
        self.daemon.create_user(username="a11y-user", authorized_domains="allowed.test", notes="for the check")
        page = self.page
        page.goto(self.base + "/")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        found = {(DESKTOP["width"], "sign-in"): serious_violations(axe, page)}
        self.sign_in()
        expect(page.get_by_role("heading", name="Users", level=1)).to_be_visible()
        for viewport in (DESKTOP, PHONE):
            page.set_viewport_size(viewport)
            for name in PAGES:
                self.go(name)
                expect(page.locator(LOADED[name]).first).to_be_attached()
                found[(viewport["width"], name)] = serious_violations(axe, page)
                if viewport is PHONE:
                    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                    self.assertLessEqual(overflow, 0, f"{name} scrolls sideways on a phone")
        self.assertEqual({key: ids for key, ids in found.items() if ids}, {})
        page.goto(self.base + "/")
        page.keyboard.press("Tab")
        self.assertEqual(page.evaluate("document.activeElement.textContent"), "Skip to content")

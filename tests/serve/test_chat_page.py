"""The chat page in a real headless Chromium (Debian's chromium driven by Playwright):
load it, send a message, see the reply stream in, and the statistics line; the
screenshot stays in the test's tmp dir (its path is printed)."""

import shutil

import pytest

from tests.serve.conftest import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install -y chromium; CI installs it)")
def test_chat_page_streams_a_reply(tiny_server, client, tmp_path):
    from playwright import sync_api  # a test dependency; only chromium may be absent
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(tiny_server.url + "/")
            assert page.title() == "llamadist chat"
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').textContent "
                                   "=== 'model: tiny'")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#input", "Once upon a time")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
            reply = page.inner_text(".msg.assistant")
            stats = page.inner_text("#stats")
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'chat.png'}")
        finally:
            browser.close()
    want = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Once upon a time"}],
        temperature=0, max_tokens=24).choices[0].message.content
    assert reply.strip() and reply == want  # the page streamed the whole greedy reply
    assert "tokens/s" in stats and stats.split()[0].isdigit()
    assert (tmp_path / "chat.png").stat().st_size > 1000

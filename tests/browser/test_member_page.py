"""The member page (/) in a real browser: <parley-chat> over the session cookie."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import SLOW, member_login

pytestmark = pytest.mark.django_db(transaction=True)


def _chat(page):
    return page.locator("parley-chat")


def _open(page, context, parley, setup):
    member_login(context, parley, setup.tenant)
    page.goto(parley.url + "/")
    expect(_chat(page).locator(".connection")).to_have_text("Connected")
    return _chat(page)


def _send(chat, text: str) -> None:
    chat.get_by_role("textbox", name="Message").fill(text)
    chat.get_by_role("button", name="Send").click()


def test_the_answer_streams_in_and_shows_its_tokens_and_cost(page, context, parley, tenant_factory, console_errors):
    chat = _open(page, context, parley, tenant_factory())
    _send(chat, f"hello there {SLOW}")
    answer = chat.locator(".msg.assistant .text").last
    expect(answer).to_contain_text("You said: hello there")
    first = len(answer.text_content())
    expect(chat.locator(".msg.assistant.streaming")).to_have_count(1)
    page.wait_for_function(
        "([el, n]) => el.textContent.length > n", arg=[answer.element_handle(), first], timeout=5000
    )  # it grows while streaming
    expect(chat.locator(".msg.assistant .meta")).to_contain_text(re.compile(r"completion tokens · \$0\.\d+"), timeout=15000)
    expect(chat.locator(".total")).to_contain_text("Conversation:")
    user = chat.locator(".msg.user").first
    assert "hello there" in user.text_content()
    parley.settle()
    assert console_errors == []


def test_stop_ends_the_answer_where_it_is(page, context, parley, tenant_factory):
    chat = _open(page, context, parley, tenant_factory())
    _send(chat, f"a long one please {SLOW}")
    expect(chat.locator(".msg.assistant .text").last).to_contain_text("You said")
    chat.get_by_role("button", name="Stop").click()
    expect(chat.locator(".msg.assistant .note")).to_have_text("Stopped.")
    expect(chat.get_by_role("button", name="Send")).to_be_enabled()
    text = chat.locator(".msg.assistant .text").last.text_content()
    page.wait_for_timeout(800)
    assert chat.locator(".msg.assistant .text").last.text_content() == text  # nothing more arrives
    parley.settle()


def test_a_reload_shows_the_same_transcript(page, context, parley, tenant_factory):
    chat = _open(page, context, parley, tenant_factory())
    _send(chat, "remember me [[sim:words=6]]")
    expect(chat.locator(".msg.assistant .meta")).to_have_count(1, timeout=15000)
    answer = chat.locator(".msg.assistant .text").last.text_content()
    page.reload()
    chat = _chat(page)
    expect(chat.locator(".msg.user")).to_have_text(["remember me [[sim:words=6]]"])
    expect(chat.locator(".msg.assistant .text")).to_have_text([answer])
    expect(chat.locator(".list li")).to_have_count(1)
    parley.settle()


def test_a_second_tab_joins_mid_stream(page, context, parley, tenant_factory):
    chat = _open(page, context, parley, tenant_factory())
    _send(chat, "first question [[sim:words=4]]")
    expect(chat.locator(".msg.assistant .meta")).to_have_count(1, timeout=15000)
    _send(chat, f"second question {SLOW}")
    expect(chat.locator(".msg.assistant.streaming .text")).to_contain_text("You said")
    other = context.new_page()
    other.goto(parley.url + "/")
    joined = _chat(other)
    # The partial answer so far, then the rest live; the question above it.
    expect(joined.locator(".msg.assistant.streaming")).to_have_count(1)
    expect(joined.locator(".msg.user")).to_have_text(["first question [[sim:words=4]]", f"second question {SLOW}"])
    expect(joined.locator(".msg.assistant .meta")).to_have_count(2, timeout=15000)
    expect(chat.locator(".msg.assistant .meta")).to_have_count(2, timeout=15000)
    assert joined.locator(".msg.assistant .text").last.text_content() == chat.locator(".msg.assistant .text").last.text_content()
    parley.settle()


def test_nothing_overflows_at_360_px(page, context, parley, tenant_factory):
    page.set_viewport_size({"width": 360, "height": 740})
    chat = _open(page, context, parley, tenant_factory())
    _send(chat, "a_very_long_unbroken_word_" * 12 + " [[sim:words=5]]")
    expect(chat.locator(".msg.assistant .meta")).to_have_count(1, timeout=15000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for name in ("Send", "New conversation"):
        box = chat.get_by_role("button", name=name).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, name
    parley.settle()


def test_the_admin_pages_a_tenant_uses_log_no_console_errors(page, context, parley, tenant_factory, console_errors):
    setup = tenant_factory()
    _open(page, context, parley, setup)
    _send(_chat(page), "for the admin [[sim:words=3]]")
    expect(_chat(page).locator(".msg.assistant .meta")).to_have_count(1, timeout=15000)
    conversation = setup.tenant.conversations.get()
    paths = [
        "/admin/", "/admin/conversations/assistant/", f"/admin/conversations/assistant/{setup.assistant.pk}/change/",
        "/admin/conversations/conversation/", f"/admin/conversations/conversation/{conversation.pk}/change/",
        "/admin/billing/usagerecord/",
    ]
    for path in paths:
        response = page.goto(parley.url + path)
        assert response is not None and response.status == 200, path
    assert console_errors == []
    parley.settle()


def test_retry_sends_the_last_message_again_after_an_error(page, context, parley, tenant_factory):
    chat = _open(page, context, parley, tenant_factory())
    failing = "try again [[sim:status=400]]"  # the upstream refuses it, every time
    _send(chat, failing)
    expect(chat.locator(".msg .note")).to_have_count(1)
    expect(chat.get_by_role("alert")).to_be_visible()
    chat.get_by_role("button", name="Retry").click()
    expect(chat.locator(".msg.user")).to_have_text([failing, failing])
    expect(chat.locator(".msg .note")).to_have_count(2)
    expect(chat.get_by_role("button", name="Retry")).to_be_visible()
    parley.settle()

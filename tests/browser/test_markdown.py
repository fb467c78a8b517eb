"""Answers are markdown rendered safely: no raw HTML from the model reaches the DOM."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from conversations.models import Conversation, Message
from tenants.services import member_end_user
from tests.browser.test_member_page import _open, _send

pytestmark = pytest.mark.django_db(transaction=True)

ANSWER = "Try this:\n\n```python\nprint('hi')\n```\n\nDocs: https://example.com/docs and [bad](data:text/html,x)"


def test_script_img_onerror_and_javascript_links_from_the_model_render_as_inert_text(page, context, parley, tenant_factory):
    chat = _open(page, context, parley, tenant_factory())
    page.evaluate("window.pwned = 0")
    # The simulator echoes the first 8 words of the message: the model "says" these.
    _send(chat, '<script>window.pwned=1</script> <img src=x onerror="window.pwned=2"> [click](javascript:window.pwned=3) **bold** [[sim:words=12]]')
    answer = chat.locator(".msg.assistant .text").last
    expect(chat.locator(".msg.assistant .meta")).to_have_count(1)
    expect(answer).to_contain_text("<script>window.pwned=1</script>")
    expect(answer).to_contain_text('<img src=x onerror="window.pwned=2">')
    expect(answer).to_contain_text("[click](javascript:window.pwned=3)")
    expect(answer.locator("strong")).to_have_text("bold")  # markdown itself renders
    assert answer.locator("script, img, [onerror]").count() == 0
    assert answer.locator("a").count() == 0
    assert page.evaluate("window.pwned") == 0
    parley.settle()


def test_links_are_only_http_and_code_blocks_get_a_copy_button(page, context, parley, tenant_factory):
    setup = tenant_factory()
    chat = _open(page, context, parley, setup)
    # A stored answer with a code block (the simulator's echo is one line), read back on open.
    end_user = member_end_user(tenant=setup.tenant, user_id=setup.tenant.memberships.get().user_id)
    conversation = Conversation.objects.create(tenant=setup.tenant, assistant=setup.assistant, end_user=end_user, title="Code", last_seq=2)
    for seq, role, content in [(1, "user", "show me"), (2, "assistant", ANSWER)]:
        Message.objects.create(tenant=setup.tenant, conversation=conversation, seq=seq, role=role, content=content)
    page.reload()
    chat.get_by_role("button", name="Code", exact=True).click()
    answer = chat.locator(".msg.assistant .text")
    expect(answer.locator("pre code")).to_have_text("print('hi')\n")
    expect(answer.locator("a")).to_have_attribute("href", "https://example.com/docs")
    expect(answer.locator("a")).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(answer).to_contain_text("[bad](data:text/html,x)")  # not a link
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=parley.url)
    answer.get_by_role("button", name="Copy code").click()
    expect(answer.get_by_role("button", name="Copy code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"

"""`bench/cost_levers.py` at a tiny size: both runs complete through the engine, `/v1` and the
Batch API, and what it prints — each run's total, the ratio, the complex questions' share on
the strong model — is what the ledger and the stored messages say."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db.models import Sum

from billing.defaults import install_default_prices
from billing.models import ModelPrice, UsageRecord
from conversations.models import Message
from moderation.defaults import install_moderation_price
from responsecache.defaults import install_embedding_price

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_tiny_cost_levers_run_is_priced_from_the_ledger(simulator_server, parley, capsys):
    from bench import cost_levers

    # Transactional tests flush what the price migrations made: put them back.
    for install in (install_default_prices, install_moderation_price, install_embedding_price):
        install(ModelPrice)

    comparison = cost_levers.levers_compare(
        provider_url=simulator_server.base_url, v1_url=parley.openai_base_url, conversations=20, batch_lines=6,
        concurrency=2,
    )
    ratio = cost_levers.report(comparison)
    base, levers = comparison.baseline, comparison.levers

    for run in (base, levers):
        ledger = UsageRecord.objects.filter(tenant_id=run.tenant_id)
        assert run.total == ledger.aggregate(total=Sum("cost_usd"))["total"] > 0
        assert sum(run.by_class.values(), Decimal(0)) == run.total
    assert ratio == float(levers.total / base.total) < 1
    # The classification job: six /v1 calls on the strong model against six batch lines on the
    # cheap one, at the batch price.
    assert base.by_kind["completion"][0] == 6 and "batch" not in base.by_kind
    assert levers.by_kind["batch"][0] == 6 and "completion" not in levers.by_kind
    assert levers.saved["batch"] > 0 and levers.saved["routing"] > 0 and base.saved["routing"] == 0
    # Who answered: everything on the strong model in the baseline; on the levers run the
    # complex questions still on it (generated there), the simple ones routed to the cheap one.
    kinds = {question.kind for question in comparison.questions}
    assert kinds == {"faq", "simple", "complex"}
    assert base.answers.by_strong == base.answers.asked and not base.answers.hits
    complex_asked = sum(question.kind == "complex" for question in comparison.questions)
    assert levers.answers.asked["complex"] == complex_asked
    strong_complex = Message.objects.filter(tenant_id=levers.tenant_id, role=Message.Role.ASSISTANT,
                                            model=cost_levers.STRONG, cached=False).count()
    assert levers.answers.by_strong["complex"] == complex_asked <= strong_complex
    assert levers.answers.by_strong["simple"] == 0
    printed = capsys.readouterr().out
    assert f"{ratio:.2f}x" in printed and f"{complex_asked}/{complex_asked} = 100.0%" in printed

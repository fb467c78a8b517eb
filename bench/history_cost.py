"""What a long conversation costs under each history strategy, from the ledger.

Plays the same scripted conversations (20, 50 and 200 turns) through the real engine — the
services a turn runs, the provider gateway and the real SDK — against the simulator over HTTP,
which caches prompt prefixes as OpenAI documents (>= 1,024 tokens, 128-token steps, per key).
Three strategies: full history, a sliding window of a fixed token budget (the common advice),
and Parley's summarise strategy (summary calls run between turns, as a worker would, and are
billed too). Prints billed dollars per 1,000 conversations recomputed from the ledger's token
columns at gpt-4o-mini prices with cached input at 50% and at 90% off, and the ratios.

    .venv/bin/python bench/history_cost.py [--lengths 20,50,200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
if not os.environ.get("DATABASE_URL"):
    os.environ.setdefault("SQLITE_PATH", os.path.join(tempfile.mkdtemp(), "bench.sqlite3"))

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db.models import Sum  # noqa: E402

from billing.models import ModelPrice, UsageRecord  # noqa: E402
from conversations import answers, summaries  # noqa: E402
from conversations.gatekeepers import Caller  # noqa: E402
from conversations.onboarding import tenant_onboard  # noqa: E402
from tenants.services import end_user_get_or_create  # noqa: E402
from tests.simserver import SimulatorServer  # noqa: E402
from tests.turns import turn_upstream  # noqa: E402

INPUT, OUTPUT = Decimal("0.30"), Decimal("1.20")  # gpt-4o-mini, USD per 1M tokens
SYSTEM_PROMPT = (
    "You are the support assistant of Example Co. Answer precisely, cite the order number when one "
    "is given, never invent policies, and keep answers under 120 words. " * 4
)
TOPICS = "order delivery refund invoice password warranty upgrade shipping account discount".split()
STRATEGIES = {
    "full": {"history_strategy": "full"},
    "window": {"history_strategy": "window", "history_window_tokens": 2000},
    "parley": {"history_strategy": "summarize"},  # the product defaults
}


def user_line(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    detail = " ".join(TOPICS[(turn + k) % len(TOPICS)] for k in range(40))
    return f"Turn {turn}: a question about my {topic}, order #{1000 + turn}. Context: {detail} [[sim:words=70]]"


def setup(strategy: str, base_url: str) -> Caller:
    onboarded = tenant_onboard(
        slug=f"cost-{strategy}-{uuid.uuid4().hex[:6]}", provider_base_url=base_url,
        provider_key=f"sk-bench-{uuid.uuid4().hex}", system_prompt=SYSTEM_PROMPT,
    )
    tenant, assistant = onboarded.tenant, onboarded.assistant
    tenant.end_user_rpm = tenant.tenant_rpm = 1_000_000
    tenant.tenant_tpm = 1_000_000_000
    tenant.save()
    for name, value in STRATEGIES[strategy].items():
        setattr(assistant, name, value)
    assistant.max_tokens = 400
    assistant.save()
    end_user = end_user_get_or_create(tenant_id=tenant.pk, external_id="bench")
    return Caller(tenant_id=tenant.pk, end_user_id=end_user.pk)


def play(caller: Caller, turns: int) -> None:
    conversation_id = None
    for turn in range(turns):
        plan = turns.turn_prepare(
            caller=caller, content=user_line(turn), conversation_id=conversation_id,
            assistant_slug=None, client_msg_id=None, control_channel="bench",
        )
        answers.turn_finish(plan=plan, outcome=turn_upstream(plan))
        conversation_id = plan.conversation_id
        if plan.summary_due:  # what the Celery worker does between turns
            summaries.conversation_summarize(tenant_id=caller.tenant_id, conversation_id=conversation_id)


def ledger_cost(tenant_id: int, cached_discount: Decimal) -> tuple[Decimal, dict[str, int]]:
    totals = UsageRecord.objects.filter(tenant_id=tenant_id).aggregate(
        prompt=Sum("prompt_tokens"), cached=Sum("cached_tokens"), completion=Sum("completion_tokens")
    )
    uncached = totals["prompt"] - totals["cached"]
    cost = (uncached * INPUT + totals["cached"] * INPUT * (1 - cached_discount) + totals["completion"] * OUTPUT)
    return cost / Decimal(1_000_000), totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="20,50,200")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    call_command("migrate", verbosity=0)
    for discount in (Decimal("0.5"), Decimal("0.9")):
        # The price table is what Parley's compaction decisions read: set the cached rate the
        # provider charges in this scenario, then play every conversation under it.
        ModelPrice.objects.filter(model="gpt-4o-mini").update(
            input_per_million=INPUT, output_per_million=OUTPUT, cached_input_per_million=INPUT * (1 - discount)
        )
        results: dict[tuple[str, int], int] = {}
        with SimulatorServer() as server:
            for turns in lengths:
                for strategy in STRATEGIES:
                    caller = setup(strategy, server.base_url)
                    play(caller, turns)
                    results[(strategy, turns)] = caller.tenant_id
        print(f"\nUSD per 1,000 conversations, gpt-4o-mini, cached input {int(discount * 100)}% off (summary calls included)")
        print(f"{'turns':>6} {'full':>10} {'window':>10} {'parley':>10} {'parley/window':>14} {'parley/min':>11}  cached share (full/window/parley)")
        for turns in lengths:
            costs, shares = {}, {}
            for strategy in STRATEGIES:
                cost, totals = ledger_cost(results[(strategy, turns)], discount)
                costs[strategy] = cost * 1000
                shares[strategy] = totals["cached"] / max(totals["prompt"], 1)
            cheapest_other = min(costs["full"], costs["window"])
            print(
                f"{turns:>6} {costs['full']:>10.2f} {costs['window']:>10.2f} {costs['parley']:>10.2f} "
                f"{costs['parley'] / costs['window']:>13.2f}x {costs['parley'] / cheapest_other:>10.2f}x  "
                + " / ".join(f"{shares[s]:.0%}" for s in STRATEGIES)
            )


if __name__ == "__main__":
    main()

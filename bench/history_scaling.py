"""Time and database queries for one turn as a conversation grows: 20, 1,000, 10,000 messages.

Runs the engine's database legs of a turn (`turn_prepare`, `turn_finish`) — everything the
engine does per message except the model's own time — in conversations of each length, for
the default summarise strategy (the conversation compacted as the summary task leaves it) and
the sliding window. Goal: the 10,000-message turn within 1.5x of the 20-message turn.

    .venv/bin/python bench/history_scaling.py            # embedded SQLite
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/parley_bench REDIS_URL=redis://127.0.0.1:6379/2 \\
    SECRET_KEY=bench FIELD_ENCRYPTION_KEYS=<fernet key> .venv/bin/python bench/history_scaling.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from conversations import (
    answers,
    turns,
)
from conversations.answers import TurnOutcome  # noqa: E402
from conversations.gatekeepers import Caller  # noqa: E402
from conversations.models import Conversation, Message  # noqa: E402
from conversations.onboarding import tenant_onboard  # noqa: E402
from tenants.services import end_user_get_or_create  # noqa: E402

SIZES = (20, 1_000, 10_000)
WORDS = "the quick brown fox jumps over the lazy dog and keeps running far away".split()


def conversation_of(size: int, strategy: str) -> tuple[Caller, Conversation]:
    onboarded = tenant_onboard(slug=f"scale-{uuid.uuid4().hex[:8]}", provider_base_url="http://127.0.0.1:9/v1")
    tenant, assistant = onboarded.tenant, onboarded.assistant
    tenant.end_user_rpm = tenant.tenant_rpm = 1_000_000
    tenant.tenant_tpm = 1_000_000_000
    tenant.save()
    assistant.history_strategy = strategy
    assistant.save()
    end_user = end_user_get_or_create(tenant_id=tenant.pk, external_id="scale")
    conversation = Conversation.objects.create(tenant=tenant, assistant=assistant, end_user=end_user)
    Message.objects.bulk_create(
        (
            Message(
                tenant=tenant, conversation=conversation, seq=i + 1, role="user" if i % 2 == 0 else "assistant",
                content=f"message {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12)), tokens=20,
            )
            for i in range(size)
        ),
        batch_size=2000,
    )
    # As the summary task leaves a long conversation: older turns summarised, ~1,500 tokens after.
    through = max(0, size - 80)
    Conversation.objects.filter(pk=conversation.pk).update(
        last_seq=size, summary="A summary of the conversation so far. " * 20 if through else "",
        summary_through_seq=through,
    )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # fresh bulk inserts have no planner statistics yet
            cursor.execute("ANALYZE conversations_message")
    return Caller(tenant_id=tenant.pk, end_user_id=end_user.pk), conversation


def turn(caller: Caller, conversation: Conversation) -> tuple[float, int]:
    with CaptureQueriesContext(connection) as queries:
        started = perf_counter()
        plan = turns.turn_prepare(
            caller=caller, content="and one more thing", conversation_id=conversation.pk,
            assistant_slug=None, client_msg_id=None, control_channel="bench",
        )
        answers.turn_finish(
            plan=plan,
            outcome=TurnOutcome(
                called_upstream=True, content="noted.", status="complete", finish_reason="stop",
                prompt_tokens=plan.prompt.tokens, completion_tokens=3, cached_tokens=0, latency_ms=1, ttft_ms=1,
            ),
        )
        elapsed = (perf_counter() - started) * 1000
    return elapsed, len(queries.captured_queries)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=60)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    print(f"database: {connection.vendor}; {args.turns} turns per cell; median ms (queries per turn)")
    print(f"{'strategy':<10}" + "".join(f"{size:>18,}" for size in SIZES) + f"{'10k / 20':>12}")
    for strategy in ("summarize", "window"):
        cells, medians = [], []
        for size in SIZES:
            caller, conversation = conversation_of(size, strategy)
            turn(caller, conversation)  # warm up
            runs = [turn(caller, conversation) for _ in range(args.turns)]
            median = statistics.median(t for t, _ in runs)
            medians.append(median)
            cells.append(f"{median:>10.2f} ms ({max(q for _, q in runs):>2})")
        print(f"{strategy:<10}" + "".join(f"{c:>18}" for c in cells) + f"{medians[-1] / medians[0]:>11.2f}x")


if __name__ == "__main__":
    main()

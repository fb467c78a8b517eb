"""Added time per turn of cap reservation + settlement, next to the same turn with no caps.

Runs the engine's two database legs (`turn_prepare`: commit the user message, assemble the
prompt, reserve; `turn_finish`: store the answer, write usage, settle) for a tenant with no
caps and for one with a tenant cap and a per-end-user cap, alternating, and prints median and
p95 per turn and the ratio. No upstream call: the model's time would only hide the difference.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/parley_bench REDIS_URL=redis://127.0.0.1:6379/2 \\
    SECRET_KEY=bench FIELD_ENCRYPTION_KEYS=<fernet key> .venv/bin/python bench/caps.py [--turns 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from billing.models import SpendingCap  # noqa: E402
from conversations import (
    answers,
    turns,
)
from conversations.answers import TurnOutcome  # noqa: E402
from conversations.gatekeepers import Caller  # noqa: E402
from conversations.onboarding import tenant_onboard  # noqa: E402
from tenants.services import end_user_get_or_create  # noqa: E402


def make_caller(*, capped: bool) -> Caller:
    onboarded = tenant_onboard(
        slug=f"bench-{uuid.uuid4().hex[:8]}",
        provider_base_url="http://127.0.0.1:9/v1",
        user_rpm=1_000_000,
        monthly_cap_usd=Decimal("1000000") if capped else None,
    )
    tenant = onboarded.tenant
    tenant.tenant_rpm, tenant.tenant_tpm = 1_000_000, 1_000_000_000
    tenant.save()
    if capped:
        SpendingCap.objects.create(tenant=tenant, scope="end_user", period="day", limit_usd=Decimal("100000"))
    end_user = end_user_get_or_create(tenant_id=tenant.pk, external_id="bench")
    return Caller(tenant_id=tenant.pk, end_user_id=end_user.pk)


def one_turn(caller: Caller, conversation_id) -> tuple[float, object]:
    started = time.perf_counter()
    plan = turns.turn_prepare(
        caller=caller, content="How much does a turn cost?", conversation_id=conversation_id,
        assistant_slug=None, client_msg_id=None, control_channel="bench",
    )
    answers.turn_finish(
        plan=plan,
        outcome=TurnOutcome(
            called_upstream=True, content="About a tenth of a cent.", status="complete", finish_reason="stop",
            prompt_tokens=plan.prompt.tokens, completion_tokens=8, cached_tokens=0, latency_ms=1, ttft_ms=1,
        ),
    )
    return (time.perf_counter() - started) * 1000, plan.conversation_id


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=300)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    plain, capped = make_caller(capped=False), make_caller(capped=True)
    timings: dict[str, list[float]] = {"no caps": [], "2 caps": []}
    conversations: dict[str, object] = {"no caps": None, "2 caps": None}
    for name, caller in (("no caps", plain), ("2 caps", capped)):  # warm up
        _, conversations[name] = one_turn(caller, None)
    for _ in range(args.turns):
        for name, caller in (("no caps", plain), ("2 caps", capped)):
            elapsed, conversations[name] = one_turn(caller, conversations[name])
            timings[name].append(elapsed)
    base, with_caps = timings["no caps"], timings["2 caps"]
    print(f"database: {connection.vendor}, turns per variant: {args.turns} (sequential, same conversation each)")
    print(f"{'variant':<10} {'median ms':>10} {'p95 ms':>10}")
    for name, values in timings.items():
        print(f"{name:<10} {statistics.median(values):>10.2f} {p95(values):>10.2f}")
    added_median = statistics.median(with_caps) - statistics.median(base)
    added_p95 = p95(with_caps) - p95(base)
    print(f"{'added':<10} {added_median:>10.2f} {added_p95:>10.2f}")
    print(f"{'ratio':<10} {statistics.median(with_caps) / statistics.median(base):>10.2f}x {p95(with_caps) / p95(base):>9.2f}x")


if __name__ == "__main__":
    main()

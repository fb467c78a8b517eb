"""One tenant's month of spend for the admin's usage page: bounded aggregates and an SVG chart's geometry."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Sum
from django.db.models.functions import TruncDay

from .models import CapAlert, SpendingCap, UsageRecord
from .selectors import month_savings

TOP_END_USERS = 10
TOP_MODELS = 50
ZERO = Decimal(0)

# Chart canvas, in SVG user units.
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 32


@dataclass(frozen=True)
class Bar:
    day: date
    cost: Decimal
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    """Daily spend bars, the month's running total and the cap, on one scale."""

    width: int
    height: int
    bars: list[Bar]
    cumulative_points: str  # an SVG polyline `points` attribute
    cap_y: float | None
    ticks: list[tuple[float, Decimal]]  # (y, amount) for the axis labels
    baseline_y: float
    left: int
    right_x: int


@dataclass(frozen=True)
class MonthUsage:
    month_start: date
    total: Decimal
    cap: SpendingCap | None
    daily: list[tuple[date, Decimal]]
    by_model: list[dict[str, Any]]
    top_end_users: list[dict[str, Any]]
    alerts: list[CapAlert]
    chart: Chart
    savings: dict[str, Any]  # {"savings": {lever: USD, "total"}, "list_cost", "cost_usd"}


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC calendar month."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    days = calendar.monthrange(month.year, month.month)[1]
    return start, start + timedelta(days=days)


def month_usage(*, tenant_id: int, month: date) -> MonthUsage:
    start, end = month_bounds(month)
    records = UsageRecord.objects.for_tenant(tenant_id).filter(created_at__gte=start, created_at__lt=end)
    daily = _daily(records, start, end)
    cap = (
        SpendingCap.objects.for_tenant(tenant_id)
        .filter(scope=SpendingCap.Scope.TENANT, period=SpendingCap.Period.MONTH)
        .order_by("limit_usd")
        .first()
    )
    total = sum((cost for _, cost in daily), ZERO)
    return MonthUsage(
        month_start=start.date(),
        total=total,
        cap=cap,
        daily=daily,
        by_model=_by_model(records),
        top_end_users=_top_end_users(records),
        alerts=list(
            CapAlert.objects.for_tenant(tenant_id).filter(period_start__gte=start, period_start__lt=end)
            .select_related("cap").order_by("-created_at")[:20]
        ),
        chart=chart(daily, cap.limit_usd if cap else None, through=datetime.now(UTC).date()),
        savings=month_savings(records),
    )


def _daily(records: Any, start: datetime, end: datetime) -> list[tuple[date, Decimal]]:
    rows = (
        records.annotate(day=TruncDay("created_at", tzinfo=UTC))
        .values("day")
        .annotate(cost=Sum("cost_usd"))
        .order_by("day")
    )
    by_day = {_as_date(row["day"]): row["cost"] or ZERO for row in rows}
    days = (end - start).days
    return [(d, by_day.get(d, ZERO)) for d in (start.date() + timedelta(days=i) for i in range(days))]


def _as_date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value


def _by_model(records: Any) -> list[dict[str, Any]]:
    return list(
        records.values("model")
        .annotate(
            calls=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost=Sum("cost_usd"),
        )
        .order_by("-cost", "model")[:TOP_MODELS]
    )


def _top_end_users(records: Any) -> list[dict[str, Any]]:
    return list(
        records.filter(end_user__isnull=False)
        .values("end_user_id", "end_user__external_id")
        .annotate(calls=Count("id"), cost=Sum("cost_usd"))
        .order_by("-cost", "end_user__external_id")[:TOP_END_USERS]
    )


def chart(daily: list[tuple[date, Decimal]], cap: Decimal | None, *, through: date | None = None) -> Chart:
    """Geometry for the template's inline SVG: no JavaScript, no CDN. The running total stops
    at `through` (today), so the current month's line does not run flat into the future."""
    running, cumulative = ZERO, []
    for _, cost in daily:
        running += cost
        cumulative.append(running)
    peak = max([running, cap or ZERO, *(cost for _, cost in daily)]) or Decimal(1)
    top = float(peak) * 1.1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(daily), 1)

    def y_of(amount: Decimal) -> float:
        return round(TOP + plot_h - float(amount) / top * plot_h, 2)

    bars = [
        Bar(day=d, cost=cost, x=round(LEFT + i * slot + slot * 0.15, 2), y=y_of(cost),
            width=round(slot * 0.7, 2), height=round(TOP + plot_h - y_of(cost), 2))
        for i, (d, cost) in enumerate(daily)
    ]
    points = " ".join(
        f"{round(LEFT + (i + 0.5) * slot, 2)},{y_of(total)}"
        for i, ((day, _), total) in enumerate(zip(daily, cumulative, strict=True))
        if through is None or day <= through
    )
    places = Decimal("0.01") if peak >= 10 else Decimal("0.0001")
    ticks = [(y_of(peak * share / 4), (peak * share / 4).quantize(places)) for share in range(5)]
    return Chart(
        width=WIDTH, height=HEIGHT, bars=bars, cumulative_points=points,
        cap_y=y_of(cap) if cap is not None else None, ticks=ticks,
        baseline_y=TOP + plot_h, left=LEFT, right_x=WIDTH - RIGHT,
    )

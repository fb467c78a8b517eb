"""Web processes that die during `/v1` calls (SIGKILL, OOM, a lost machine): their liveness
records, and the sweep that books and releases what they held.

A web process that holds anything for `/v1` (an exact reservation, a cap lease) first writes
its `WebProcess` row (`process_register`), tags those holds with its id, and then beats every
GENERATION_HEARTBEAT_SECONDS: one UPDATE per beat carrying the checkpoint of every call in
flight — ids, holds, price, prompt tokens and the completion tokens streamed so far
(`process_beat`). A row whose beat is older than GENERATION_STALE_SECONDS belongs to a
process that died. The sweep (`processes_recover`, on beat) claims it by deleting it — a
conditional delete under the row's lock, so one sweeper wins — and in the same transaction
books each call's last checkpoint as a UsageRecord with outcome `interrupted` (a lower bound:
what streamed after the last beat is not billed), settles the exact reservations, books the
leased calls through their leases and gives back what is left of the leases.

The race with a process that was slow, not dead: its settlements take a KEY SHARE lock on its
own row (`process_alive`), which the sweep's FOR UPDATE waits for and which waits for the
sweep. Either the process booked first (the sweep finds its UsageRecord and books nothing
more), or the sweep did (the process finds its row gone and books nothing: the checkpoint
was billed for it). A process whose beat finds its row gone stops its calls, forgets its leases
(the sweep gave them back) and registers again under a new id.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from .caps import cap_settle
from .leases import LEASE_CALL_PREFIX, lease_book, lease_release
from .models import Reservation, UsageRecord, WebProcess
from .services import Price, UsageInput, usage_record

logger = logging.getLogger(__name__)


def process_register() -> uuid.UUID:
    """A new liveness record for this process; its holds carry the id returned."""
    return WebProcess.objects.create(host=socket.gethostname()[:255], pid=os.getpid(), beat_at=timezone.now()).pk


def process_beat(*, process_id: uuid.UUID, calls: list[dict[str, Any]]) -> bool:
    """Refresh the beat and the calls' checkpoints; False when the sweep took the process
    for dead (its row is gone): nothing it holds is its own any more."""
    return bool(WebProcess.objects.filter(pk=process_id).update(beat_at=timezone.now(), calls=calls))


def process_forget(*, process_id: uuid.UUID) -> None:
    """A clean exit, once the leases are given back and no call is in flight."""
    WebProcess.objects.filter(pk=process_id).delete()


_ALIVE = "SELECT 1 FROM {table} WHERE id = %s FOR KEY SHARE"


def process_alive(process_id: uuid.UUID) -> bool:
    """Inside the caller's transaction: whether the process still owns its holds, kept true
    until that transaction ends (the sweep's claim waits for it). KEY SHARE does not conflict
    with the process's own beats, only with the sweep's claim."""
    if connection.vendor != "postgresql":  # SQLite serialises writers: an existence check is enough
        return WebProcess.objects.filter(pk=process_id).exists()
    with connection.cursor() as cursor:
        cursor.execute(_ALIVE.format(table=WebProcess._meta.db_table), [process_id])
        return cursor.fetchone() is not None


def stale_before():
    return timezone.now() - timedelta(seconds=settings.GENERATION_STALE_SECONDS)


def processes_stale() -> list[uuid.UUID]:
    return list(WebProcess.objects.filter(beat_at__lt=stale_before()).values_list("pk", flat=True))


def processes_recover() -> int:
    """Beat: book and release what every dead process held. Returns how many were swept."""
    swept = 0
    for process_id in processes_stale():
        try:
            swept += process_recover(process_id=process_id)
        except Exception:
            logger.exception("could not recover web process %s", process_id)
    return swept


def process_recover(*, process_id: uuid.UUID) -> bool:
    """Claim a dead process and settle everything it held, in one transaction; False when it
    beat meanwhile or another sweeper has it (skip_locked: a sweeper never waits for one)."""
    with transaction.atomic():
        process = (
            WebProcess.objects.select_for_update(skip_locked=True)
            .filter(pk=process_id, beat_at__lt=stale_before())
            .first()
        )
        if process is None:
            return False
        process.delete()
        booked = [_checkpoint_book(call) for call in process.calls]
        released = _holds_release(process_id)
    logger.warning(
        "web process %s:%s (%s) stopped beating: %d /v1 calls booked from their checkpoints, %d holds released",
        process.host, process.pid, process_id, sum(booked), released,
    )
    return True


def _checkpoint_book(call: dict[str, Any]) -> bool:
    """One call's last checkpoint as its UsageRecord, booked through its holds; nothing when
    the process wrote the record itself before it died (then only its hold is settled)."""
    record = UsageRecord.objects.filter(call_id=call["call_id"]).first()
    created = record is None
    if record is None:
        leases = [(uuid.UUID(rid), period_id) for rid, period_id in call.get("leases") or ()]
        record = usage_record(
            usage=UsageInput(
                call_id=call["call_id"], tenant_id=call["tenant_id"], model=call["model"],
                prompt_tokens=call["prompt_tokens"], completion_tokens=call["completion_tokens"],
                cached_tokens=call.get("cached_tokens", 0), estimated=not call.get("usage", False),
                kind=UsageRecord.Kind.COMPLETION, outcome=UsageRecord.Outcome.INTERRUPTED,
                end_user_id=uuid.UUID(call["end_user_id"]) if call.get("end_user_id") else None,
                api_key_id=call.get("api_key_id"), lease_ids=tuple(str(rid) for rid, _ in leases),
            ),
            price=Price(
                model=call["model"], input=Decimal(call["price"][0]), cached_input=Decimal(call["price"][1]),
                output=Decimal(call["price"][2]), context_window=0,
            ),
        )
        for reservation_id, period_id in leases:
            lease_book(reservation_id=reservation_id, period_id=period_id, actual=record.cost_usd)
    if call.get("reservation_id"):
        reservation = Reservation.objects.filter(pk=call["reservation_id"]).first()
        if reservation is not None:
            cap_settle(reservation=reservation, actual=record.cost_usd)
    return created


def _holds_release(process_id: uuid.UUID) -> int:
    """What the process still holds: leases give back their rest (what they booked is spent);
    an exact reservation with no checkpoint (admitted after the last beat) is settled from its
    UsageRecord when one was written, otherwise at zero."""
    released = 0
    for held in Reservation.objects.filter(process_id=process_id, status=Reservation.Status.HELD):
        if held.call_id.startswith(LEASE_CALL_PREFIX):
            lease_release(reservation_id=held.pk, period_id=held.period_ids[0])
        else:
            record = UsageRecord.objects.filter(call_id=held.call_id).first()
            cap_settle(reservation=held, actual=record.cost_usd if record else Decimal(0))
        released += 1
    return released

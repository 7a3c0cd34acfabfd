"""The usage ledger: every model call writes one UsageRecord with tokens, cost and latency."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections

from kb.models import ApiKey, Document, UsageRecord
from kb.ops.log_privacy import redact
from kb.ops.observability import current_request_id
from kb.providers.retrying import FailedAttempt, failed_attempts_recorded
from kb.selectors import Caller, signed_in_user

logger = logging.getLogger(__name__)

# A model call that was made is billed whether or not its row gets written, so a write
# that meets a dropped connection (a database restart, a failover) reconnects and tries
# again for about this long before giving up.
_LEDGER_WRITE_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)

_MILLION = Decimal(1_000_000)


def model_cost(*, model: str, input_tokens: int, output_tokens: int = 0) -> Decimal:
    """USD for a call, from settings.KB_MODEL_PRICES (per million tokens); 0 if unpriced."""
    prices = settings.KB_MODEL_PRICES.get(model)
    if prices is None:
        # Providers often return dated names (gpt-4o-mini-2024-07-18); price by family.
        prices = next(
            (p for name, p in settings.KB_MODEL_PRICES.items() if model.startswith(name + "-")),
            None,
        )
    if not prices:
        return Decimal(0)
    return (
        Decimal(str(prices.get("input", 0))) * input_tokens
        + Decimal(str(prices.get("output", 0))) * output_tokens
    ) / _MILLION


class UsageBuffer:
    """Ledger rows held back, then written together by flush().

    Chat holds the rows of its query embedding and search until the answer's first token
    is on its way: each row written at once is a commit, and the commits cost time before
    that token. A call that costs money is never held (tracked_model_call writes its row
    ahead of the call); held rows are local or cached calls, and searches.
    """

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def flush(self, *, conversation_id: uuid.UUID | str | None = None) -> None:
        """Write the held rows in one statement (tagged with the conversation, if given)."""
        records, self.records = self.records, []
        if not records:
            return
        for record in records:
            if conversation_id is not None and record.conversation_id is None:
                record.conversation_id = conversation_id
        UsageRecord.objects.bulk_create(records)


def usage_record_create(
    *,
    kind: str,
    provider: str,
    model: str,
    input_tokens: int = 0,
    output_tokens: int = 0,
    latency_ms: float = 0.0,
    time_to_first_token_ms: float | None = None,
    cache_hit: bool = False,
    saved_cost_usd: Decimal | None = None,
    status: str = UsageRecord.Status.OK,
    error: str = "",
    user: Caller | None = None,
    api_key: ApiKey | None = None,
    document: Document | None = None,
    conversation_id: uuid.UUID | str | None = None,
    request_id: str = "",
    buffer: UsageBuffer | None = None,
) -> UsageRecord:
    """Write one ledger row, pricing it from the model's price table (or hold it in `buffer`)."""
    cost = Decimal(0) if cache_hit else model_cost(
        model=model, input_tokens=input_tokens, output_tokens=output_tokens
    )
    record = UsageRecord(
        kind=kind,
        provider=provider,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost,
        saved_cost_usd=saved_cost_usd or Decimal(0),
        latency_ms=latency_ms,
        time_to_first_token_ms=time_to_first_token_ms,
        cache_hit=cache_hit,
        status=status,
        # Provider errors can echo credentials (a key in a 401, a password in a URL).
        error=redact(error)[:2000],
        user=signed_in_user(user),
        api_key=api_key,
        document=document,
        conversation_id=conversation_id,
        # The id of the request or task this call serves (kb.ops.observability), unless given.
        request_id=request_id or current_request_id(),
    )
    if buffer is not None:
        buffer.records.append(record)
        return record
    return _ledger_write(record)


def _ledger_write(record: UsageRecord, *, update_fields: list[str] | None = None) -> UsageRecord:
    """Save the row, reconnecting through a dropped connection outside a transaction."""
    connection = connections[UsageRecord.objects.db]
    for delay in (*_LEDGER_WRITE_DELAYS, None):
        try:
            if update_fields:
                record.save(update_fields=update_fields)
            else:
                record.save(force_insert=True)
            return record
        except (OperationalError, InterfaceError) as exc:
            # Inside a transaction the row goes (or not) with the rest of it; retrying on a
            # new connection would commit it alone.
            if delay is None or connection.in_atomic_block:
                raise
            logger.warning("Usage ledger write failed (%s); reconnecting in %.1fs",
                           exc.__class__.__name__, delay)
            with contextlib.suppress(DatabaseError):
                connection.close()
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass
class TrackedCall:
    """Filled in by the caller inside `tracked_model_call`; written when the block exits."""

    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token_ms: float | None = None
    # Set when the model ran while the block waited on something else too: the model's own
    # time, not the block's.
    latency_ms: float | None = None
    extra: dict = field(default_factory=dict)


IN_FLIGHT_ERROR = "No outcome recorded: the process stopped during the call."
_OUTCOME_FIELDS = ["input_tokens", "output_tokens", "cost_usd", "latency_ms",
                   "time_to_first_token_ms", "status", "error"]


@contextmanager
def tracked_model_call(
    *, kind: str, provider: str, model: str, write_ahead: bool = False, **record_fields
) -> Iterator[TrackedCall]:
    """Time a model call and record it, as ok or as an error, whatever happens inside.

    write_ahead (for calls that cost money) writes the row before the call, as
    "interrupted", and fills in the outcome after: a process killed mid-call (SIGKILL, OOM)
    still leaves the call in the ledger, so no billable call goes unaccounted for.
    """
    # A call written ahead costs money: its row goes in now, never into a buffer.
    placeholder = usage_record_create(
        kind=kind, provider=provider, model=model, status=UsageRecord.Status.INTERRUPTED,
        error=IN_FLIGHT_ERROR, **{**record_fields, "buffer": None},
    ) if write_ahead else None
    call = TrackedCall()
    started = time.perf_counter()
    try:
        with failed_attempts_recorded() as retried:
            yield call
    except Exception as exc:
        retried_attempts_record_usage(retried, kind=kind, provider=provider, model=model,
                                **record_fields)
        _outcome_record(placeholder, call, started, kind=kind, provider=provider, model=model,
                        status=UsageRecord.Status.ERROR,
                        error=f"{exc.__class__.__name__}: {exc}", **record_fields)
        raise
    retried_attempts_record_usage(retried, kind=kind, provider=provider, model=model,
                                  **record_fields)
    _outcome_record(placeholder, call, started, kind=kind, provider=provider, model=model,
                    **record_fields)


def _outcome_record(placeholder: UsageRecord | None, call: TrackedCall, started: float, *,
                    model: str, status: str = UsageRecord.Status.OK, error: str = "",
                    **record_fields) -> None:
    latency_ms = (
        call.latency_ms if call.latency_ms is not None
        else (time.perf_counter() - started) * 1000
    )
    if placeholder is None:
        usage_record_create(
            model=model, input_tokens=call.input_tokens, output_tokens=call.output_tokens,
            latency_ms=latency_ms, time_to_first_token_ms=call.time_to_first_token_ms,
            status=status, error=error, **record_fields,
        )
        return
    placeholder.input_tokens, placeholder.output_tokens = call.input_tokens, call.output_tokens
    placeholder.cost_usd = model_cost(model=model, input_tokens=call.input_tokens,
                                      output_tokens=call.output_tokens)
    placeholder.latency_ms = latency_ms
    placeholder.time_to_first_token_ms = call.time_to_first_token_ms
    placeholder.status, placeholder.error = status, redact(error)[:2000]
    _ledger_write(placeholder, update_fields=_OUTCOME_FIELDS)


def retried_attempts_record_usage(attempts: Sequence[FailedAttempt], **record_fields) -> None:
    """One error row per request a backend sent and then retried (no tokens billed)."""
    for attempt in attempts:
        usage_record_create(latency_ms=attempt.latency_ms, status=UsageRecord.Status.ERROR,
                            error=attempt.error, **record_fields)

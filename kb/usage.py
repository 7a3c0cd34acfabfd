"""The usage ledger: every model call writes one UsageRecord with tokens, cost and latency."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings

from kb.models import UsageRecord
from kb.observability import current_request_id

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
    user=None,
    api_key=None,
    document=None,
    conversation_id=None,
    request_id: str = "",
) -> UsageRecord:
    """Write one ledger row, pricing it from the model's price table."""
    cost = Decimal(0) if cache_hit else model_cost(
        model=model, input_tokens=input_tokens, output_tokens=output_tokens
    )
    return UsageRecord.objects.create(
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
        error=error[:2000],
        user=user if getattr(user, "is_authenticated", False) else None,
        api_key=api_key,
        document=document,
        conversation_id=conversation_id,
        # The id of the request or task this call serves (kb.observability), unless given.
        request_id=request_id or current_request_id(),
    )


@dataclass
class TrackedCall:
    """Filled in by the caller inside `tracked_model_call`; written when the block exits."""

    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token_ms: float | None = None
    extra: dict = field(default_factory=dict)


@contextmanager
def tracked_model_call(
    *, kind: str, provider: str, model: str, **record_fields
) -> Iterator[TrackedCall]:
    """Time a model call and record it, as ok or as an error, whatever happens inside."""
    call = TrackedCall()
    started = time.perf_counter()
    try:
        yield call
    except Exception as exc:
        usage_record_create(
            kind=kind, provider=provider, model=model,
            input_tokens=call.input_tokens, output_tokens=call.output_tokens,
            latency_ms=(time.perf_counter() - started) * 1000,
            time_to_first_token_ms=call.time_to_first_token_ms,
            status=UsageRecord.Status.ERROR, error=f"{exc.__class__.__name__}: {exc}",
            **record_fields,
        )
        raise
    usage_record_create(
        kind=kind, provider=provider, model=model,
        input_tokens=call.input_tokens, output_tokens=call.output_tokens,
        latency_ms=(time.perf_counter() - started) * 1000,
        time_to_first_token_ms=call.time_to_first_token_ms,
        **record_fields,
    )

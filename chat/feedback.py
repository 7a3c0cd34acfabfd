"""Feedback on answers: one vote per person and answer, up or down, with a reason and a
comment. The answer's citations and retrieval evidence are on the message it points at."""

from __future__ import annotations

from django.db import transaction

from chat.models import AnswerFeedback, Message
from kb.models import ApiKey
from kb.selectors import AnyUser, signed_in_user


class FeedbackRefused(ValueError):
    """Feedback that cannot be recorded (not an answer, nobody signed in); says why."""


@transaction.atomic
def feedback_record(
    *, message: Message, user: AnyUser, api_key: ApiKey | None, rating: str,
    reason: str = "", comment: str = "",
) -> AnswerFeedback:
    """Record the caller's vote on an answer, replacing their earlier one."""
    voter = signed_in_user(user)
    if voter is None:
        raise FeedbackRefused("Sign in to rate answers.")
    if message.role != Message.Role.ASSISTANT:
        raise FeedbackRefused("Only answers can be rated.")
    feedback, _ = AnswerFeedback.objects.update_or_create(
        message=message, user=voter,
        defaults={"rating": rating, "reason": reason, "comment": comment.strip()[:4000],
                  "api_key": api_key},
    )
    return feedback


def feedback_withdraw(*, message: Message, user: AnyUser) -> int:
    """Remove the caller's vote on an answer; how many were removed (0 or 1)."""
    voter = signed_in_user(user)
    if voter is None:
        return 0
    deleted, _ = AnswerFeedback.objects.filter(message=message, user=voter).delete()
    return deleted

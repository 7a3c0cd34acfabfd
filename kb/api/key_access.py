"""Who may create, see and revoke which API keys, and what a new key may read.

A staff user manages only their own keys unless they hold kb.manage_all_api_keys
(superusers hold every permission). A key never reads more than the person who grants
it: its collections are narrowed to what the granter and the key's own user may both
read, and a key with no collections (which reads all its user may) is granted only by a
superuser or by the key's user to themselves. The admin calls these; so does anything
else that creates keys.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.utils import timezone

from kb.models import ApiKey, Collection
from kb.selectors import AnyUser, collections_visible, signed_in_user

MANAGE_ALL_PERMISSION = "kb.manage_all_api_keys"


class ApiKeyGrantError(ValueError):
    """A key would carry access its granter does not have; `field` names the culprit."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def api_key_manages_all(*, user: AnyUser) -> bool:
    """Whether the user may create, see and revoke every user's keys."""
    return bool(getattr(user, "is_active", False) and user.has_perm(MANAGE_ALL_PERMISSION))


def api_keys_manageable(*, user: AnyUser) -> QuerySet[ApiKey]:
    """The keys a staff user may see, edit and revoke: their own, or all with the permission."""
    owner = signed_in_user(user)
    if owner is None:
        return ApiKey.objects.none()
    if api_key_manages_all(user=owner):
        return ApiKey.objects.all()
    return ApiKey.objects.filter(user_id=owner.pk)


def api_key_owners_assignable(*, user: AnyUser) -> QuerySet[User]:
    """The users a granter may create keys for: themselves, or every active user."""
    users = get_user_model().objects.filter(is_active=True)
    if api_key_manages_all(user=user):
        return users
    granter = signed_in_user(user)
    return users.filter(pk=granter.pk) if granter is not None else users.none()


def api_key_collections_grantable(
    *, granter: AnyUser, owner: User | None = None
) -> QuerySet[Collection]:
    """Collections a key may be narrowed to: readable by the granter and by the key's user."""
    collections = collections_visible(user=granter)
    if owner is not None:
        collections = collections.filter(pk__in=collections_visible(user=owner).values("pk"))
    return collections


def api_key_grant_check(
    *, granter: AnyUser, owner: User, collections: Iterable[Collection]
) -> None:
    """Raise ApiKeyGrantError unless `granter` may give `owner` a key reading `collections`."""
    if not api_key_owners_assignable(user=granter).filter(pk=owner.pk).exists():
        raise ApiKeyGrantError(
            "You may create keys only for yourself; managing other users' keys needs the "
            "“Can manage every user's API keys” permission.", field="user",
        )
    wanted = {collection.pk for collection in collections}
    if not wanted:
        if granter.is_superuser or owner.pk == granter.pk:
            return
        raise ApiKeyGrantError(
            "Choose the collections this key may read: a key without collections reads "
            "everything its user may, which can be more than you may.", field="collections",
        )
    grantable = set(
        api_key_collections_grantable(granter=granter, owner=owner)
        .filter(pk__in=wanted).values_list("pk", flat=True)
    )
    refused = Collection.objects.filter(pk__in=wanted - grantable).order_by("slug")
    if refused:
        names = ", ".join(collection.slug for collection in refused)
        raise ApiKeyGrantError(
            f"This key cannot read {names}: both you and the key's user must be able to read "
            "every collection it is given.", field="collections",
        )


def api_keys_revoke(*, actor: AnyUser, keys: QuerySet[ApiKey]) -> int:
    """Revoke the active keys among `keys` that `actor` may manage; the number revoked."""
    manageable = api_keys_manageable(user=actor)
    return (
        keys.filter(pk__in=manageable.values("pk"), revoked_at__isnull=True)
        .update(revoked_at=timezone.now())
    )

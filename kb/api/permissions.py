"""The admin's permissions, for the REST views that do what an admin page does."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission, DjangoModelPermissions
from rest_framework.request import Request

from kb.models import ApiKey


class AdminModelPermissions(DjangoModelPermissions):
    """Django's model permissions as the admin applies them: reading needs “Can view”
    (DRF's default lets any authenticated caller read), adding “Can add”, and so on."""

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }
    message = "You do not have the permission this needs; ask an administrator."


def key_is_narrowed(request: Request) -> bool:
    """Whether the request came with an API key narrowed to some collections."""
    key = request.auth if isinstance(request.auth, ApiKey) else None
    return key is not None and key.collections.exists()


class WholeKnowledgeBaseKey(BasePermission):
    """Refuses a key narrowed to some collections: what these views read or change (the
    usage ledger, budgets, the answer cache) spans every collection."""

    message = "A key narrowed to some collections cannot read or change this."

    def has_permission(self, request: Request, view: Any) -> bool:
        return not key_is_narrowed(request)


ADMIN_MODEL = [AdminModelPermissions, WholeKnowledgeBaseKey]

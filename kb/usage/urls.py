"""/admin/usage/: the usage dashboard, behind the admin's own staff login (kb.usage.views)."""

from django.contrib import admin
from django.urls import path

from kb.usage.views import usage_dashboard

urlpatterns = [
    path("", admin.site.admin_view(usage_dashboard), name="usage-dashboard"),
]

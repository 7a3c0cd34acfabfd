"""/metrics, the Prometheus scrape endpoint (kb.ops.metrics)."""

from django.urls import path

from kb.ops.metrics import metrics_view

urlpatterns = [
    path("", metrics_view, name="metrics"),
]

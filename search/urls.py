"""Search API routes: search, and golden sets."""

from django.urls import path

from search.api import SearchView
from search.golden_api import GoldenQueryDetail, GoldenQueryList

urlpatterns = [
    path("search", SearchView.as_view(), name="api-search"),
    path("golden-queries/", GoldenQueryList.as_view(), name="api-golden-query-list"),
    path("golden-queries/<int:pk>/", GoldenQueryDetail.as_view(),
         name="api-golden-query-detail"),
]

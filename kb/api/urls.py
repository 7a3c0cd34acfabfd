"""Core API routes: collections, documents (list, upload, detail, actions), chunks, API keys,
embedding models, the usage ledger."""

from django.urls import path

from kb.api import embedding_models, keys, views
from kb.usage import api as usage_api

urlpatterns = [
    path("collections/", views.CollectionList.as_view(), name="api-collection-list"),
    path("collections/<slug:slug>/", views.CollectionDetail.as_view(),
         name="api-collection-detail"),
    path("documents/", views.DocumentListCreate.as_view(), name="api-document-list"),
    path("documents/<int:pk>/", views.DocumentDetail.as_view(), name="api-document-detail"),
    path("documents/<int:pk>/disable/", views.DocumentDisable.as_view(),
         name="api-document-disable"),
    path("documents/<int:pk>/enable/", views.DocumentEnable.as_view(), name="api-document-enable"),
    path("documents/<int:pk>/reprocess/", views.DocumentReprocess.as_view(),
         name="api-document-reprocess"),
    path("documents/<int:pk>/replace/", views.DocumentReplace.as_view(),
         name="api-document-replace"),
    path("chunks/", views.ChunkList.as_view(), name="api-chunk-list"),
    path("chunks/<int:pk>/", views.ChunkDetail.as_view(), name="api-chunk-detail"),
    path("keys/", keys.ApiKeyListCreate.as_view(), name="api-key-list"),
    path("keys/<int:pk>/", keys.ApiKeyDetail.as_view(), name="api-key-detail"),
    path("usage/", usage_api.UsageRecordList.as_view(), name="api-usage-list"),
    path("usage/report/", usage_api.UsageReport.as_view(), name="api-usage-report"),
    path("embedding-models/", embedding_models.EmbeddingModelList.as_view(),
         name="api-embedding-model-list"),
    path("embedding-models/<slug:key>/", embedding_models.EmbeddingModelDetail.as_view(),
         name="api-embedding-model-detail"),
    path("embedding-models/<slug:key>/activate/", embedding_models.EmbeddingModelActivate.as_view(),
         name="api-embedding-model-activate"),
    path("embedding-models/<slug:key>/cancel/", embedding_models.EmbeddingModelCancel.as_view(),
         name="api-embedding-model-cancel"),
    path("embedding-models/<slug:key>/drop-vectors/",
         embedding_models.EmbeddingModelDropVectors.as_view(),
         name="api-embedding-model-drop-vectors"),
]

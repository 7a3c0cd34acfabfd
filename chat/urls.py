"""Chat routes. Included at the site root with prefix "", so paths here are complete."""

from django.urls import path

from chat import api, management_api, openai_compat, views

urlpatterns = [
    path("chat/", views.chat_page, name="chat"),
    path("chat/shared/<str:token>/", views.shared_conversation_page, name="chat-shared"),
    path("api/v1/chat", api.chat, name="chat-api"),
    path("api/v1/chat/messages/<uuid:pk>", api.MessageDetail.as_view(), name="chat-message"),
    path("api/v1/chat/messages/<uuid:pk>/feedback", api.MessageFeedback.as_view(),
         name="chat-message-feedback"),
    path("api/v1/conversations", api.ConversationList.as_view(), name="conversation-list"),
    path("api/v1/conversations/<uuid:pk>", api.ConversationDetail.as_view(),
         name="conversation-detail"),
    path("api/v1/conversations/<uuid:pk>/export", api.ConversationExport.as_view(),
         name="conversation-export"),
    path("api/v1/conversations/<uuid:pk>/share", api.ConversationShare.as_view(),
         name="conversation-share"),
    path("api/v1/budgets/", management_api.BudgetList.as_view(), name="api-budget-list"),
    path("api/v1/budgets/<int:pk>/", management_api.BudgetDetail.as_view(),
         name="api-budget-detail"),
    path("api/v1/quality/", management_api.QualityReport.as_view(), name="api-quality"),
    path("api/v1/answer-cache/", management_api.AnswerCacheList.as_view(),
         name="api-answer-cache-list"),
    path("api/v1/answer-cache/<int:pk>/", management_api.AnswerCacheDetail.as_view(),
         name="api-answer-cache-detail"),
    path("v1/chat/completions", openai_compat.chat_completions, name="openai-chat-completions"),
    path("v1/models", openai_compat.models, name="openai-models"),
]

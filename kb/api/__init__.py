"""The REST API: views, serializers, URLs, errors, pagination, authentication, rate limits,
schema."""

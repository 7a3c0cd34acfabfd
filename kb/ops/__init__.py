"""Running the product: the database and embedded server, bootstrap, the web process, worker
threads, metrics, tracing, request ids and logs, health, security headers, middleware."""

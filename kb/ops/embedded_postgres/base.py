"""The stock PostgreSQL backend, pointed at the embedded server's socket on first connect."""

from pathlib import Path

from django.db.backends.postgresql import base

from kb.ops.database import embedded_server_socket_dir


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self) -> dict:
        params = super().get_connection_params()
        params["host"] = embedded_server_socket_dir(Path(self.settings_dict["EMBEDDED_PGDATA"]))
        return params

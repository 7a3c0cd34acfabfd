#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
    if sys.argv[1:2] == ["serve"]:
        # Before the settings load, which decide from it what a process that serves
        # requests gets: pooled database connections, one torch thread (kb/settings.py).
        os.environ["KB_PROCESS_ROLE"] = "web"
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()

"""Web hardening: deploy checks, security headers, CORS, filename sanitising."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kb.services.uploads import filename_sanitize

ROOT = Path(__file__).resolve().parents[2]


def test_check_deploy_is_clean_under_production_settings(tmp_path):
    """`manage.py check --deploy` reports nothing with KB_PRODUCTION=true."""
    env = {**os.environ, "KB_PRODUCTION": "true", "DEBUG": "false", "KB_DATA_DIR": str(tmp_path),
           "SECRET_KEY": "x" * 30 + "-production-secret-key-with-enough-entropy-9f8e7d6c",
           "ALLOWED_HOSTS": "kb.example.com"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_its_own_secret_key(tmp_path):
    env = {**os.environ, "KB_PRODUCTION": "true", "KB_DATA_DIR": str(tmp_path)}
    env.pop("SECRET_KEY", None)
    result = subprocess.run([sys.executable, str(ROOT / "manage.py"), "check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "SECRET_KEY" in result.stderr


@pytest.mark.django_db
def test_pages_carry_security_headers(client, admin_user):
    client.force_login(admin_user)
    response = client.get("/chat/")
    assert "script-src 'self'" in response["Content-Security-Policy"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"


@pytest.mark.django_db
def test_cors_allows_only_configured_origins_on_the_api(client, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    allowed = client.options("/api/v1/search", HTTP_ORIGIN="https://app.example.com",
                             HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST")
    denied = client.options("/api/v1/search", HTTP_ORIGIN="https://evil.example.com",
                            HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST")
    assert allowed["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Access-Control-Allow-Origin" not in denied


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("bad\x00name\x07.txt", "badname.txt"),
        ("   .hidden  ", "hidden"),
        ("", "unnamed"),
        ("a" * 300 + ".pdf", "a" * 196 + ".pdf"),
    ],
)
def test_filenames_are_sanitised(raw, expected):
    assert filename_sanitize(raw) == expected

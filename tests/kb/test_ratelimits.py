"""rate_limit_parse reads a rate as django-ratelimit does, without its private parser."""

from __future__ import annotations

import pytest
from django_ratelimit.core import _split_rate

from kb.api.ratelimits import rate_limit_parse

RATES = ["600/m", "5/s", "10/5m", "1/h", "100/d", "7/", "3/2", "600/M", "600/mfoo", "0/0m"]


@pytest.mark.parametrize("rate", RATES)
def test_reads_a_rate_as_django_ratelimit_does(rate):
    """Pinned against the library, so an upgrade that reads rates differently shows here."""
    assert rate_limit_parse(rate) == _split_rate(rate)


@pytest.mark.parametrize("rate", ["", "fast", "/m", "m/600", "-1/m"])
def test_refuses_what_django_ratelimit_cannot_read(rate):
    with pytest.raises(ValueError):
        rate_limit_parse(rate)
    with pytest.raises((ValueError, AttributeError)):  # the library fails on these too
        _split_rate(rate)


def test_known_rates():
    assert rate_limit_parse("600/m") == (600, 60)
    assert rate_limit_parse("10/5m") == (10, 300)

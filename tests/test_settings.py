"""Settings: every variable documented, explicit arguments over the environment, a bad value
named at start, the trusted proxies parsed."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from metrics_service import Settings
from metrics_service.errors import ConfigError
from metrics_service.settings import load_settings


def test_explicit_arguments_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METRICS_RATE_LIMIT", "7")
    monkeypatch.setenv("METRICS_TRUSTED_PROXIES", "10.0.0.1")
    assert Settings(db_path=tmp_path / "m.db").rate_limit_per_min == 7
    explicit = Settings(db_path=tmp_path / "m.db", rate_limit_per_min=9, trusted_proxies="")
    assert explicit.rate_limit_per_min == 9 and explicit.trusted_networks == ()


def test_a_bad_value_is_refused_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_RATE_LIMIT", "many")
    with pytest.raises(ConfigError, match="METRICS_RATE_LIMIT"):
        load_settings()


def test_trusted_proxies_are_addresses_and_networks(tmp_path: Path) -> None:
    s = Settings(db_path=tmp_path / "m.db", trusted_proxies=" 10.0.0.0/8, 192.0.2.1 ,::1,")
    assert s.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("::1/128"),
    )


def test_a_bad_trusted_proxies_value_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METRICS_TRUSTED_PROXIES", "10.0.0.0/8,not-an-address")
    with pytest.raises(ConfigError, match=r"METRICS_TRUSTED_PROXIES.*not-an-address"):
        load_settings()


def test_settings_default_rollup_retention_is_longer_than_raw(settings: Settings) -> None:
    assert settings.rollup_retention_days > settings.retention_days


def test_a_short_admin_key_stops_start_up_without_printing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METRICS_ADMIN_API_KEY", "hunter2-secret")
    with pytest.raises(ConfigError, match=r"METRICS_ADMIN_API_KEY.*at least 16") as raised:
        load_settings()
    assert "hunter2" not in str(raised.value)
    # Empty, as compose passes an unset variable: no admin key, as when unset.
    monkeypatch.setenv("METRICS_ADMIN_API_KEY", "")
    assert load_settings().admin_api_key is None
    monkeypatch.setenv("METRICS_ADMIN_API_KEY", "a" * 16)
    assert load_settings().admin_api_key == "a" * 16

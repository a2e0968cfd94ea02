"""Provider Batch API settings in SLUICE_CONFIG, and which batches a provider delegates."""

from __future__ import annotations

import pytest

from service.core.config import ConfigError, Settings


def _settings(tmp_path, body: str, **env: str) -> Settings:
    path = tmp_path / "sluice.toml"
    path.write_text(body)
    return Settings.from_env({"SLUICE_CONFIG": str(path), **env})


def test_defaults_execute_and_openai_limits(tmp_path):
    p = _settings(tmp_path, '[providers.a]\nbase_url = "http://a"\n').provider("a")
    assert (p.batch_api, p.has_batch_api, p.batch_max_lines, p.batch_max_bytes) == (
        "execute",
        False,
        50_000,
        200 * 2**20,
    )
    assert p.batch_delete_files is True and p.batch_poll_s <= p.batch_poll_max_s
    assert not p.delegates("24h", 86400)


def test_modes(tmp_path):
    s = _settings(
        tmp_path,
        """
[providers.d]
base_url = "http://d"
batch_api = "delegate"
batch_max_lines = 3
batch_poll_s = 0.2
batch_poll_max_s = 1

[providers.auto_yes]
base_url = "http://y"
batch_api = "auto"
has_batch_api = true

[providers.auto_no]
base_url = "http://n"
batch_api = "auto"
""",
    )
    assert s.provider("d").delegates("24h", 86400) and s.provider("d").batch_max_lines == 3
    assert s.provider("auto_yes").delegates("24h", 86400)
    assert not s.provider("auto_no").delegates("24h", 86400), "auto needs has_batch_api"
    # Sluice's own window shorter than the provider's 24 h: auto executes, delegate still delegates.
    short = _settings(tmp_path, (tmp_path / "sluice.toml").read_text(), SLUICE_COMPLETION_WINDOW_S="3600")
    assert not short.provider("auto_yes").delegates("24h", short.completion_window_s)
    assert short.provider("d").delegates("24h", short.completion_window_s)


@pytest.mark.parametrize(
    "line, needle",
    [
        ('batch_api = "sometimes"', "batch_api"),
        ("batch_max_lines = 0", "batch_max_lines"),
        ("batch_poll_s = 0", "batch_poll_s"),
        ("batch_poll_s = 10\nbatch_poll_max_s = 5", "batch_poll_max_s"),
        ("batch_delete_files = 3", "batch_delete_files"),
    ],
)
def test_bad_values_name_the_setting(tmp_path, line, needle):
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, f'[providers.a]\nbase_url = "http://a"\n{line}\n')
    assert needle in str(info.value) and "SLUICE_CONFIG" in str(info.value)


def test_only_windows_of_24h_or_more_delegate(tmp_path):
    from service.core.config import window_seconds

    s = _settings(tmp_path, '[providers.auto]\nbase_url = "http://y"\nbatch_api = "auto"\nhas_batch_api = true\n')
    p = s.provider("auto")
    for window, delegated in (
        ("1h", False),
        ("6h", False),
        ("23h", False),
        ("24h", True),
        ("1d", True),
        ("48h", True),
        ("7d", True),
    ):
        assert p.delegates(window, window_seconds(window, s.completion_window_s)) is delegated, window
    # Shortened for tests, "48h" lasts less than the provider's 24 h: executed here.
    short = _settings(
        tmp_path,
        '[providers.auto]\nbase_url = "http://y"\nbatch_api = "auto"\nhas_batch_api = true\n',
        SLUICE_COMPLETION_WINDOW_S="600",
    )
    assert not short.provider("auto").delegates("48h", window_seconds("48h", short.completion_window_s))


def test_adaptive_concurrency_settings(tmp_path):
    body = """
[providers.a]
base_url = "http://a"

[providers.fixed]
base_url = "http://f"
adaptive = false
max_concurrency = 8

[providers.tuned]
base_url = "http://t"
adaptive = true
adaptive_decrease = 0.5
adaptive_start = 32
"""
    s = _settings(tmp_path, body, SLUICE_UPSTREAM_URL="http://u")
    assert s.provider("a").is_adaptive and s.provider("default").is_adaptive
    assert (s.provider("a").adaptive_decrease, s.provider("a").adaptive_start) == (0.7, 16)
    assert not s.provider("fixed").is_adaptive
    assert (s.provider("tuned").adaptive_decrease, s.provider("tuned").adaptive_start) == (0.5, 32)
    off = _settings(tmp_path, body, SLUICE_UPSTREAM_URL="http://u", SLUICE_ADAPTIVE_CONCURRENCY="off")
    assert not off.provider("a").is_adaptive and not off.provider("default").is_adaptive
    assert off.provider("tuned").is_adaptive, "a provider's own setting wins over the variable"
    with pytest.raises(ConfigError, match="SLUICE_ADAPTIVE_CONCURRENCY"):
        _settings(tmp_path, body, SLUICE_ADAPTIVE_CONCURRENCY="maybe")
    with pytest.raises(ConfigError, match="SLUICE_CONFIG"):
        _settings(tmp_path, '[providers.x]\nbase_url = "http://x"\nadaptive_decrease = 1.5\n')

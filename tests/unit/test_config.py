"""One config tree: defaults < TOML < SWARM_* env < explicit overrides; broken input is named."""

from __future__ import annotations

import pytest

from core.config import load_settings
from core.errors import ConfigError


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "swarm.toml"
    config.write_text('run_id = "from-toml"\n[network]\nport = 1111\nhost = "10.0.0.1"\n[peer]\nthreads = 3\n')
    monkeypatch.setenv("SWARM_NETWORK__PORT", "2222")
    settings = load_settings(config, network={"host": "127.0.0.1", "port": None})
    assert settings.run_id == "from-toml"
    assert settings.network.port == 2222  # env beats TOML
    assert settings.network.host == "127.0.0.1"  # a given flag beats both
    assert settings.peer.threads == 3
    assert settings.bootstrap.lr == 1e-4  # untouched default


def test_swarm_toml_in_the_working_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "swarm.toml").write_text('[bootstrap]\nnum_stages = 5\n')
    monkeypatch.chdir(tmp_path)
    assert load_settings().bootstrap.num_stages == 5


@pytest.mark.parametrize(
    "toml, words",
    [
        ("[network]\nport = 'high'\n", "network.port"),
        ("[network]\nport = 70000\n", "network.port"),
        ("[peer]\nthreads = 0\n", "peer.threads"),
        ("[bootstrap]\ndtype = 'float64'\n", "bootstrap.dtype"),
        ("[bootstrap]\nwire = 'int4'\n", "bootstrap.wire"),
        ("[peer]\nqueue_size = 0\n", "peer.queue_size"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("run_id = 'has spaces'\n", "run_id"),
        ("this is [not toml", "cannot read config"),
        ("[peer]\naverager_process = true\n", "peer.averager_process needs network.dht_process = true"),
    ],
)
def test_broken_config_is_a_config_error_naming_the_field(tmp_path, toml, words):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert words in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_checkpoint_settings_come_from_toml_and_env(tmp_path, monkeypatch):
    config = tmp_path / "swarm.toml"
    config.write_text("[peer]\ncheckpoint_every = 10\n[trainer]\ncheckpoint_every = 7\n")
    monkeypatch.setenv("SWARM_PEER__CHECKPOINT_KEEP", "3")
    settings = load_settings(config)
    assert (settings.peer.checkpoint_every, settings.peer.checkpoint_keep, settings.trainer.checkpoint_every) == (10, 3, 7)
    monkeypatch.setenv("SWARM_PEER__CHECKPOINT_EVERY", "0")
    with pytest.raises(ConfigError, match="peer.checkpoint_every"):
        load_settings(config)


@pytest.mark.parametrize("value, expected", [(2, "2"), ("2", "2"), ("2-3", "2-3"), (" 0 - 3 ", "0-3"), (None, None)])
def test_peer_stage_is_a_stage_or_a_range(value, expected):
    assert load_settings(peer={"stage": value}).peer.stage == expected


@pytest.mark.parametrize("toml, words", [
    ("[peer]\nstage = '3-2'\n", "ends before it starts"),
    ("[peer]\nstage = 'two'\n", "not a stage or a range"),
    ("[peer]\nstage = -1\n", "not a stage or a range"),
    ("[peer]\nmax_stages = 0\n", "peer.max_stages"),
    ("[peer]\nthroughput = 0\n", "peer.throughput"),
])
def test_bad_span_settings_name_the_field(tmp_path, toml, words):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match="peer") as caught:
        load_settings(config)
    assert words in str(caught.value)


def test_the_dht_process_is_a_setting_an_averager_process_needs(tmp_path):
    config = tmp_path / "swarm.toml"
    config.write_text("[network]\ndht_process = true\n[peer]\naverager_process = true\n")
    settings = load_settings(config)
    assert settings.network.dht_process and settings.peer.averager_process
    assert not load_settings(tmp_path / "swarm.toml", network={"dht_process": False}, peer={"averager_process": False}).network.dht_process

"""The adapter-loading flags refuse bad values before anything loads: a usage error (exit 2) naming them."""

from __future__ import annotations

import pytest

from server.cli import build_parser, main, settings_from_args


@pytest.mark.parametrize("value", ["0", "-1", "65", "four"])
def test_bad_adapter_load_workers_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--adapter-load-workers", value])
    assert exit_info.value.code == 2
    assert "adapter_load_workers" in capsys.readouterr().err


@pytest.mark.parametrize("env", ["maybe", "2"])
def test_bad_preload_adapters_from_the_environment(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LORASERVE_PRELOAD_ADAPTERS", env)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    assert "preload_adapters" in capsys.readouterr().err


def test_good_values_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_PRELOAD_ADAPTERS", "true")
    args = build_parser().parse_args(["serve", "--adapter-load-workers", "8"])
    settings = settings_from_args(args)
    assert settings.adapter_load_workers == 8 and settings.preload_adapters is True
    args = build_parser().parse_args(["serve", "--no-preload-adapters"])
    assert settings_from_args(args).preload_adapters is False


@pytest.mark.parametrize("command", ["serve", "serve-ray"])
def test_help_prints_every_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse formats help with %: a description such as "80% of free memory" must not break --help
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--kv-cache-memory" in out and "80% of" in out

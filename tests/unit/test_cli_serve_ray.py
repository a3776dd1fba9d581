"""``loraserve serve-ray`` flags: bad values are usage errors naming the setting, before Ray starts; good
ones reach ``ScaleSettings`` and the engine ``Settings``; ``build_app`` (``serve run`` / KubeRay) refuses
unknown keys."""

from __future__ import annotations

import pytest

from server.cli import build_parser, main, scale_settings_from_args, settings_from_args


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--replicas", "0", "replicas"),
        ("--replicas", "two", "replicas"),
        ("--num-cpus", "-0.5", "num_cpus"),
        ("--num-gpus", "-1", "num_gpus"),
    ],
)
def test_bad_scale_flags_are_usage_errors(
    flag: str, value: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-ray", flag, value])
    assert exit_info.value.code == 2
    assert field in capsys.readouterr().err


def test_bad_routing_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve-ray", "--routing", "random"])
    assert "--routing" in capsys.readouterr().err


def test_scale_and_engine_flags_reach_their_settings() -> None:
    args = build_parser().parse_args(
        [
            "serve-ray",
            "--replicas",
            "3",
            "--num-cpus",
            "0.5",
            "--routing",
            "round_robin",
            "--max-num-seqs",
            "4",
        ]
    )
    scale = scale_settings_from_args(args)
    assert (scale.replicas, scale.num_cpus, scale.num_gpus, scale.routing) == (3, 0.5, 0.0, "round_robin")
    assert scale.ray_address is None
    assert settings_from_args(args).max_num_seqs == 4


def test_build_app_refuses_unknown_settings() -> None:
    pytest.importorskip("ray.serve")
    from server.scale.deployments import build_app

    with pytest.raises(ValueError, match="replica_count"):
        build_app({"replica_count": "2"})

"""`python -m compression run` argument handling; the pipeline itself is the lead's (mocked here)."""
import pytest

from compression import __main__ as cli
from compression import pipeline


def test_cli_builds_the_job_spec_and_calls_run_job(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run_job(spec, out_dir, *, progress, should_stop):
        seen.update(spec=spec, out_dir=out_dir)
        progress({"stage": "compress", "fraction": 0.5, "message": "layer 1/2"})
        assert should_stop() is False
        return {"recipe_summary": "W4A16", "size": {}, "evaluation": {}, "timings": {}}

    monkeypatch.setattr(pipeline, "run_job", fake_run_job)
    rc = cli.main(["run", "--model", "demo", "--recipe", "W4A16", "--group-size", "64", "--out", str(tmp_path / "o"),
                   "--samples", "16", "--seqlen", "128"])
    assert rc == 0
    spec = seen["spec"]
    assert spec["model"] == "demo" and spec["trust_remote_code"] is False
    assert spec["recipe"]["preset"] == "W4A16" and spec["recipe"]["preset_options"] == {"group_size": 64}
    assert spec["calibration"] == {"source": "calibration/self_instruct_seed_tasks.jsonl", "samples": 16,
                                   "seqlen": 128}
    assert spec["evaluation"] == {"tasks": ["wikitext2_ppl"]}
    assert '"recipe_summary": "W4A16"' in capsys.readouterr().out


def test_cli_accepts_a_yaml_recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("q:\n  q_modifiers:\n    QuantizationModifier: {scheme: FP8_DYNAMIC}\n")
    args = cli.build_parser().parse_args(["run", "--model", "demo", "--recipe", str(path), "--out", "x"])
    spec = cli.build_spec(args)
    assert spec["recipe"]["preset"] is None and "q" in spec["recipe"]["stages"]


def test_cli_rejects_an_unknown_recipe(capsys):
    assert cli.main(["run", "--model", "demo", "--recipe", "W3", "--out", "x"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_cli_requires_model_recipe_and_out():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--model", "demo"])


def test_cli_can_skip_evaluation_and_the_speed_measurement():
    args = cli.build_parser().parse_args(["run", "--model", "demo", "--recipe", "FP8_DYNAMIC", "--out", "x",
                                          "--tasks", "", "--no-speed"])
    spec = cli.build_spec(args)
    assert spec["evaluation"] == {"tasks": [], "speed": False}
    default = cli.build_spec(cli.build_parser().parse_args(["run", "--model", "demo", "--recipe", "FP8", "--out", "x"]))
    assert "speed" not in default["evaluation"] and default["evaluation"]["tasks"] == ["wikitext2_ppl"]

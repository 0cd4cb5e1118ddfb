"""GET /api/presets and GET /api/compare?model=..."""
import pytest

from compression.recipe import PRESETS, Recipe
from jobs.models import Job
from tests.jobs.factories import make_job

from .conftest import errors

pytestmark = pytest.mark.django_db


def test_presets_list_every_preset_as_dict_and_yaml(api):
    presets = api.get("/api/presets").json()["presets"]
    assert [p["name"] for p in presets] == list(PRESETS)
    w4 = next(p for p in presets if p["name"] == "W4A16")
    assert w4["description"] == PRESETS["W4A16"]
    assert Recipe.from_dict(w4["recipe"]) == Recipe.from_preset("W4A16")
    assert Recipe.from_yaml(w4["yaml"]).to_dict()["stages"] == w4["recipe"]["stages"]


def test_presets_work_with_a_session(browser):
    assert len(browser.get("/api/presets").json()["presets"]) == len(PRESETS)


def succeeded(owner, model, recipe_name, results):
    job = make_job(owner, model_source=model, recipe_name=recipe_name)
    Job.claim(job.id, "w")
    Job.succeed(job.id, results, str(job.id), 1)
    return job


def results(recoveries, weight_bytes, speed=None):
    metrics = [{"task": f"t{i}", "metric": "acc", "baseline": 0.5, "compressed": 0.5 * (r or 0) / 100,
                "higher_is_better": True, "recovery_pct": r} for i, r in enumerate(recoveries)]
    out = {"evaluation": {"metrics": metrics},
           "size": {"dense_bytes": 270_000_000, "compressed_weight_bytes": weight_bytes, "ratio": 2.0}}
    if speed:
        out["speed"] = speed
    return out


def test_compare_gives_numbers_for_my_succeeded_jobs_of_one_model(api, owner, outsider):
    fp8 = succeeded(owner, "demo", "FP8_DYNAMIC", results([99.0, 97.0], 150_000_000, {"speedup": 1.4}))
    w4 = succeeded(owner, "demo", "W4A16", results([95.5, None], 90_000_000))
    succeeded(owner, "org/other", "W4A16", results([90.0], 1))
    make_job(owner, model_source="demo")  # queued: no numbers yet
    succeeded(outsider, "demo", "W8A8", results([99.9], 1))
    data = api.get("/api/compare?model=demo").json()
    assert data["model"] == "demo"
    assert [row["id"] for row in data["jobs"]] == [str(fp8.id), str(w4.id)]
    first, second = data["jobs"]
    assert first["recovery_pct"] == 98.0 and first["size_mb"] == 150.0 and first["speedup"] == 1.4
    assert first["recipe_name"] == "FP8_DYNAMIC" and first["size"]["ratio"] == 2.0
    assert second["recovery_pct"] == 95.5 and second["speedup"] is None and second["speed"] is None
    assert len(second["metrics"]) == 2
    assert first["links"]["self"].endswith(f"/api/jobs/{fp8.id}")


def test_compare_copes_with_jobs_without_numbers(browser, owner):
    succeeded(owner, "demo", "FP8", {})
    row = browser.get("/api/compare?model=demo").json()["jobs"][0]
    assert row["recovery_pct"] is None and row["size_mb"] is None and row["metrics"] == []


def test_compare_needs_a_model(api):
    response = api.get("/api/compare")
    assert response.status_code == 400 and "required" in errors(response)["model"]

"""Slow submits: the demo model's config is parsed from its GGUF file once and then read from a JSON
cache by every process; web servers warm it at start-up."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jobs.apps import should_warm

ROOT = Path(__file__).resolve().parents[2]


def _config_in_fresh_process(cache_dir: Path) -> dict:
    code = ("import json, time; from compression.model_io.loading import load_config; t = time.monotonic(); "
            "c = load_config('demo'); print(json.dumps({'hidden': c.hidden_size, 'layers': c.num_hidden_layers, "
            "'type': c.model_type, 'arch': type(c).__name__}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "COMPRESSOR_CONFIG_CACHE_DIR": str(cache_dir)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_second_process_reads_the_cached_config_not_the_gguf(tmp_path):
    first = _config_in_fresh_process(tmp_path)
    (cached,) = tmp_path.glob("demo-config-*.json")
    assert json.loads(cached.read_text())["hidden_size"] == 576
    # prove the second process uses the cache: change it and see the change
    data = json.loads(cached.read_text())
    data["num_hidden_layers"] = 29
    cached.write_text(json.dumps(data))
    second = _config_in_fresh_process(tmp_path)
    assert first == {"hidden": 576, "layers": 30, "type": "llama", "arch": "LlamaConfig"}
    assert second == {**first, "layers": 29}


def test_only_web_servers_warm_the_config(monkeypatch):
    assert should_warm(["/app/.venv/bin/gunicorn", "compressor_ui.wsgi:application"])
    assert should_warm(["manage.py", "runserver"])
    assert not should_warm(["manage.py", "migrate"]) and not should_warm(["/x/pytest"])
    assert not should_warm(["/x/celery", "-A", "compressor_ui", "worker"])
    monkeypatch.setenv("COMPRESSOR_WARM_DEMO_CONFIG", "0")
    assert not should_warm(["gunicorn"])

"""The wheel contains the three code packages and the model files the runtime needs."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_contents(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(tmp_path.glob("dgemma-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for required in (
        "dgemma/__init__.py",
        "dgemma/runtime/__init__.py",
        "dgemma/runtime/model.py",
        "dgemma/runtime/loading.py",
        "dgemma/converter/__init__.py",
        "dgemma/kernels/__init__.py",
        "dgemma/models/diffusiongemma-26B-A4B-it/config.json",
        "dgemma/models/diffusiongemma-26B-A4B-it/generation_config.json",
        # the bundled default model of dgemma-run: everything it needs at run time
        "dgemma/models/dgemma-tiny-code/config.json",
        "dgemma/models/dgemma-tiny-code/generation_config.json",
        "dgemma/models/dgemma-tiny-code/model.safetensors",
        "dgemma/models/dgemma-tiny-code/tokenizer.model",
        "dgemma/models/dgemma-tiny-code/tokenizer_config.json",
        "dgemma/models/dgemma-tiny-code/README.md",
        "dgemma/converter/calib/default.jsonl",
    ):
        assert required in names, required
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)
    # transformers is a test-only extra, never a runtime requirement
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheels[0]).read(meta).decode()
    reqs = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    assert any("transformers" in line and "extra ==" in line for line in reqs)
    assert not any("transformers" in line and "extra" not in line for line in reqs)


def test_package_never_imports_transformers():
    code = "import sys, dgemma, dgemma.runtime.loading, dgemma.runtime.model; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr

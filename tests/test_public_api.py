"""The public names of ``cloq_engine``: what the README uses is exported, lazily, and the command
line's internals and the research harness are not reachable as attributes."""
import importlib
import subprocess
import sys

import pytest

import cloq_engine as ce

# name -> the module that defines it (the README imports these from `cloq_engine`)
README_NAMES = {
    "prepare_pretrained": "cloq_engine.hf.streaming", "plan_ranks": "cloq_engine.rank_plan",
    "export_gptq": "cloq_engine.export", "prepare_from_gptq": "cloq_engine.export",
    "PrepareReport": "cloq_engine.hf.prepare", "QuantLoRAExperts": "cloq_engine.experts",
}


@pytest.mark.parametrize("name", README_NAMES)
def test_what_the_readme_uses_is_exported(name):
    assert name in ce.__all__ and name in dir(ce)
    assert getattr(ce, name) is getattr(importlib.import_module(README_NAMES[name]), name)


def test_import_stays_free_of_torch_and_transformers_and_internals_are_not_attributes():
    code = """
import sys
import cloq_engine as ce
assert "transformers" not in sys.modules and "torch" not in sys.modules, "eager import"
for internal in ("commands", "research", "cli", "finetune"):
    try:
        getattr(ce, internal)
    except AttributeError:
        continue
    raise SystemExit(f"ce.{internal} is reachable")
assert ce.hf.__name__ == "cloq_engine.hf" and ce.init.__name__ == "cloq_engine.init"
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]

"""The core import stays light: frameworks load only with their integration module."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate", "torchvision",
              "matplotlib")


def _loaded_after(statement: str) -> set[str]:
    code = (f"import sys; {statement}; "
            f"print(' '.join(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(out.stdout.split())


def test_import_autoaccum_loads_no_framework():
    assert _loaded_after("import autoaccum, autoaccum.integrations") == set()


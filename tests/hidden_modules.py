"""Make installed packages look uninstalled in this process (as on a plain `pip install distill`
without the hf extra): `import torch` raises ModuleNotFoundError and
`importlib.util.find_spec("torch")` is None, exactly as when torch is absent."""

from __future__ import annotations

import importlib.machinery
import sys


def hide(*top_level: str) -> None:
    """From now on, the packages named (and their submodules) cannot be found."""

    class _Hiding(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            if fullname.partition(".")[0] in top_level:
                return None
            return super().find_spec(fullname, path, target)

    sys.meta_path[:] = [_Hiding if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
    for name in [m for m in sys.modules if m.partition(".")[0] in top_level]:
        del sys.modules[name]

"""Run Python as on the GPU machine: packages installed here that it lacks, and that the GPU bundle does not bring,
cannot be imported.

    python tests/benchmarks/gpu_machine_python.py SCRIPT [ARGS...]
    python tests/benchmarks/gpu_machine_python.py -c CODE

A meta-path hook wraps every finder so that none finds the top-level modules of the blocked distributions: ``import monai`` raises ``ModuleNotFoundError`` and ``importlib.util.find_spec("monai")`` returns
``None``, exactly as where the package is absent. Allowed: the standard library, modules of no installed
distribution (the repository's own), the GPU machine's packages and the bundle's
(``benchmarks/prepare_gpu_bundle.py``: ``GPU_MACHINE_PACKAGES``, ``BUNDLED_PACKAGES``) with everything they require.
The blocked names that were asked for are appended, one a line, to ``$GPU_MACHINE_BLOCKED_LOG`` when set.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def blocked_modules() -> set[str]:
    """Top-level module names that only distributions the GPU machine (with the bundle) lacks provide."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from prepare_gpu_bundle import BUNDLED_PACKAGES, GPU_MACHINE_PACKAGES, _normalise, requirement_closure
    finally:
        sys.path.pop(0)
    allowed = requirement_closure(GPU_MACHINE_PACKAGES + BUNDLED_PACKAGES)
    allowed.add(_normalise("dagan-gn"))  # the repository itself is sent (its own requirements are not)
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if not any(_normalise(d) in allowed for d in dists):
            blocked.add(module)
    return blocked - set(sys.stdlib_module_names)


class HideBlocked:
    """Wraps one ``sys.meta_path`` finder: blocked top-level names (and their submodules) are not found by it."""

    def __init__(self, finder, blocked: set[str], log: str | None) -> None:
        self.finder, self.blocked, self.log = finder, blocked, log

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in self.blocked:
            if self.log:
                with open(self.log, "a") as fh:
                    fh.write(top + "\n")
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(fullname, path, target) if find is not None else None

    def __getattr__(self, name):  # invalidate_caches, find_distributions (importlib.metadata), ...
        return getattr(self.finder, name)


def install() -> set[str]:
    """Wrap every meta-path finder (so no finder can find a blocked module) and forget blocked modules already
    imported by site hooks; returns the blocked names."""
    blocked = blocked_modules()
    log = os.environ.get("GPU_MACHINE_BLOCKED_LOG")
    sys.meta_path[:] = [HideBlocked(f, blocked, log) for f in sys.meta_path]
    for name in [m for m in sys.modules if m.partition(".")[0] in blocked]:
        del sys.modules[name]
    return blocked


if __name__ == "__main__":
    install()
    if len(sys.argv) >= 3 and sys.argv[1] == "-c":
        code = sys.argv[2]
        sys.argv = ["-c", *sys.argv[3:]]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        script = sys.argv[1]
        sys.argv = sys.argv[1:]
        runpy.run_path(script, run_name="__main__")

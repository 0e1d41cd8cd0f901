"""One malloc arena: set for this process on glibc and passed to child processes through the environment."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from bicro_clean.pipeline import allocator


def test_environment_carries_the_limit_to_children(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    allocator.use_one_malloc_arena()
    assert os.environ["MALLOC_ARENA_MAX"] == "1"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_ARENA_MAX'])"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "1"


def test_a_user_value_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.use_one_malloc_arena() is False
    assert os.environ["MALLOC_ARENA_MAX"] == "4"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_glibc_accepts_the_limit() -> None:
    code = ("import os; os.environ.pop('MALLOC_ARENA_MAX', None); "
            "from bicro_clean.pipeline.allocator import use_one_malloc_arena; print(use_one_malloc_arena())")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "True"


def test_the_cli_sets_it_before_anything_else() -> None:
    code = "import os, bicro_clean.cli; print(os.environ.get('MALLOC_ARENA_MAX'))"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "1"

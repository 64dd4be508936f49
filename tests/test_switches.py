"""hwattn.switches: the HWATTN_* environment switches read a known value or refuse by name."""

import subprocess
import sys

import pytest

from hwattn.switches import env_choice, env_flag


def test_a_switch_reads_its_value_or_its_default(monkeypatch):
    monkeypatch.delenv("HWATTN_TEST_SWITCH", raising=False)
    assert env_choice("HWATTN_TEST_SWITCH", ("auto", "1", "0"), "auto") == "auto"
    assert env_flag("HWATTN_TEST_SWITCH") is False
    assert env_flag("HWATTN_TEST_SWITCH", default=True) is True
    monkeypatch.setenv("HWATTN_TEST_SWITCH", "1")
    assert env_flag("HWATTN_TEST_SWITCH") is True
    monkeypatch.setenv("HWATTN_TEST_SWITCH", "0")
    assert env_flag("HWATTN_TEST_SWITCH", default=True) is False


def test_an_unknown_value_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("HWATTN_TEST_SWITCH", "true")
    with pytest.raises(ValueError, match="HWATTN_TEST_SWITCH must be 0 or 1, got 'true'"):
        env_flag("HWATTN_TEST_SWITCH")
    with pytest.raises(ValueError, match=r"HWATTN_TEST_SWITCH must be one of \('auto', '1', '0'\)"):
        env_choice("HWATTN_TEST_SWITCH", ("auto", "1", "0"), "auto")


@pytest.mark.parametrize("name, module", [("HWATTN_SKINNY_GEMM", "hwattn.ops.linear"),
                                          ("HWATTN_COMPOSE_ABSORB", "hwattn.layers.mla"),
                                          ("HWATTN_COMBINE", "hwattn.ops.kernels.combine")])
def test_the_library_refuses_a_bad_switch_at_import(name, module):
    """A switch once read as off whatever it held ("true", "yes") now stops the import."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], env={name: "yes", "PATH": ""},
                          capture_output=True, text=True)
    assert done.returncode != 0 and f"{name} must be" in done.stderr and "'yes'" in done.stderr

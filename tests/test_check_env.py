"""scripts/check_env.py: the installed packages against requirements.txt's pins."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "scripts", "check_env.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_env  # noqa: E402


def test_every_line_of_requirements_is_an_exact_pin():
    pins = check_env.read_pins(os.path.join(ROOT, "requirements.txt"))
    assert pins["transformers"] == "5.24.0" and pins["pyyaml"] == "6.0.4" and pins["typing-extensions"] == "4.16.0"


def test_a_range_is_refused_with_its_line(tmp_path):
    path = tmp_path / "req.txt"
    path.write_text("# tested\ntorch==2.14.1\ntransformers>=5.17,<6\n")
    with pytest.raises(ValueError, match=r"req\.txt:3: 'transformers>=5\.17,<6' is not an exact pin"):
        check_env.read_pins(path)


def test_differences_name_missing_and_other_versions_in_pin_order():
    pins = {"torch": "2.14.1", "peft": "0.21.2", "av": "18.1.0"}
    installed = {"torch": "2.11.0", "av": "18.1.0"}
    assert check_env.differences(pins, installed) == [
        "torch: 2.11.0 installed, 2.14.1 tested",
        "peft: not installed (tested: 0.21.2)",
    ]
    assert check_env.differences(pins, installed, ignore_missing=True) == ["torch: 2.11.0 installed, 2.14.1 tested"]


def test_this_environment_is_the_tested_set():
    # CI installs requirements.txt into a fresh venv, so the script must find nothing to report there.
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "match the tested set (torch 2.14.1, transformers 5.24.0" in result.stdout


def test_a_different_environment_exits_1_and_says_how_to_fix_it(tmp_path):
    path = tmp_path / "req.txt"
    path.write_text("transformers==0.0.1\nno-such-package-xyz==1.0\n")
    result = subprocess.run([sys.executable, SCRIPT, "--requirements", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "transformers: 5.24.0 installed, 0.0.1 tested" in result.stdout
    assert "no-such-package-xyz: not installed (tested: 1.0)" in result.stdout
    assert "pip install -r requirements.txt" in result.stdout


def test_the_package_requires_the_pinned_versions():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    pins = check_env.read_pins(os.path.join(ROOT, "requirements.txt"))
    for requirement in dependencies:
        name, version = requirement.split("==")
        assert pins[check_env.canonical(name)] == version, f"pyproject.toml's {requirement} is not requirements.txt's"
    assert {"transformers", "torch", "peft", "nicegui"} <= {check_env.canonical(r.split("==")[0]) for r in dependencies}


def test_the_package_builds_with_a_pinned_backend():
    # requirements.txt's "-e ." builds the project in an isolated environment: its backend must be pinned too.
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        requires = tomllib.load(handle)["build-system"]["requires"]
    assert requires and all(check_env.PIN.match(requirement) for requirement in requires), requires

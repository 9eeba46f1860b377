"""scripts/newest_releases.py (scripts/check_upgrades.sh's check): the direct dependencies whose newest release did
not install, each with pip's reason in one line. pip's outputs here are canned, as pip 26.3 printed them."""

import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import newest_releases  # noqa: E402

INDEX_VERSIONS = """transformers (5.25.0)
Available versions: 5.25.0, 5.24.0, 5.23.0, 4.57.6, 0.1
  INSTALLED: 5.24.0
  LATEST:    5.25.0
"""

# pip install --dry-run transformers==5.25.0 ...: it needs a kernels release the registry does not have.
NO_MATCHING_RELEASE = """Looking in indexes: https://pypi.org/simple, file:///opt/pypi/simple
Collecting transformers==5.25.0
  Downloading transformers-5.25.0-py3-none-any.whl (13.8 MB)
Requirement already satisfied: numpy>=1.17 in /venv/lib/python3.11/site-packages (from transformers==5.25.0) (2.4.6)
ERROR: Could not find a version that satisfies the requirement kernels<0.20,>=0.19.1 (from transformers) (from \
versions: 0.1.7, 0.2.0, 0.5.0.dev0, 0.16.2, 0.17.0, 0.17.1, 0.17.2)
ERROR: No matching distribution found for kernels<0.20,>=0.19.1 (from transformers)
"""

# pip install --dry-run torch==2.15.0 ... under a constraint file that caps torch.
CAPPED = """Looking in indexes: https://pypi.org/simple, file:///opt/pypi/simple
ERROR: Cannot install torch==2.15.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested torch==2.15.0
    The user requested (constraint) torch<=2.14.1

Additionally, some packages in these conflicts have no matching distributions available for your environment:
    torch

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-\
dependency-conflicts
"""

# pip install --dry-run numpy==3.0.0 matplotlib ...: an installed package's requirement excludes it.
CONFLICT = """Collecting numpy==3.0.0
ERROR: Cannot install matplotlib and numpy==3.0.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested numpy==3.0.0
    matplotlib 3.11.2 depends on numpy<3 and >=1.23
    contourpy 1.3.3 depends on numpy<3 and >=1.25

To fix this you could try to:
1. loosen the range of package versions you've specified

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_the_newest_release_is_the_first_line_of_pip_index_versions():
    assert newest_releases.parse_newest(INDEX_VERSIONS) == "5.25.0"
    assert newest_releases.parse_newest("ERROR: No matching distribution found for nonexistent\n") is None


def test_constraint_files_come_from_pip_config_list():
    config = ("global.cert='/etc/ssl/certs/ca-certificates.crt'\nglobal.constraint='/etc/xdg/pip/constraints.txt'\n"
              ":env:.constraint='/a.txt /b.txt'\n:env:.find-links='/opt/wheels'\n")
    assert newest_releases.constraint_files(config) == ["/etc/xdg/pip/constraints.txt", "/a.txt", "/b.txt"]
    assert newest_releases.constraint_files("global.cert='/x'\n") == []


@pytest.mark.parametrize("output, name, version, line", [
    (NO_MATCHING_RELEASE, "transformers", "5.25.0",
     "transformers 5.25.0 depends on kernels<0.20,>=0.19.1; the newest kernels is 0.17.2"),
    (NO_MATCHING_RELEASE.replace("0.1.7, 0.2.0, 0.5.0.dev0, 0.16.2, 0.17.0, 0.17.1, 0.17.2", "none"), "transformers",
     "5.25.0", "transformers 5.25.0 depends on kernels<0.20,>=0.19.1; the registry has no kernels"),
    (NO_MATCHING_RELEASE.replace("(from transformers)", "(from peft)"), "transformers", "5.25.0",
     "peft depends on kernels<0.20,>=0.19.1; the newest kernels is 0.17.2"),
    (CAPPED, "torch", "2.15.0", "a pip constraint caps torch<=2.14.1, in /etc/xdg/pip/constraints.txt"),
    (CONFLICT, "numpy", "3.0.0",
     "matplotlib 3.11.2 depends on numpy<3 and >=1.23; contourpy 1.3.3 depends on numpy<3 and >=1.25"),
    ("Collecting av==19.0.0\nERROR: Failed to build 'av' when getting requirements to build wheel\n", "av", "19.0.0",
     "Failed to build 'av' when getting requirements to build wheel"),  # anything else: pip's last error line
], ids=["no matching release", "no release at all", "a dependency's requirement", "constraint", "conflict", "other"])
def test_pips_reason_in_one_line(output, name, version, line):
    assert newest_releases.reason(output, name, version, ["/etc/xdg/pip/constraints.txt"]) == line


def test_a_dry_run_that_installs_names_what_else_it_changes():
    report = {"install": [{"metadata": {"name": "peft", "version": "0.22.0"}},
                          {"metadata": {"name": "Accelerate", "version": "1.14.0"}},
                          {"metadata": {"name": "safetensors", "version": "0.8.0"}}]}
    installed = {"peft": "0.21.2", "accelerate": "1.15.0", "safetensors": "0.8.0"}
    assert newest_releases.changes(report, installed, "peft") == ["Accelerate 1.15.0 -> 1.14.0"]


def test_only_the_names_whose_newest_release_is_not_installed_get_a_line():
    names = ["torch", "transformers", "huggingface_hub", "Pillow", "gone", "missing"]
    newest = {"torch": "2.15.0", "transformers": "5.25.0", "huggingface_hub": "2.4.0", "Pillow": "13.0.0",
              "gone": None, "missing": "1.0"}
    installed = {"torch": "2.14.1+cpu", "transformers": "5.24.0", "huggingface-hub": "2.4.0", "pillow": "13.0.0"}
    asked = []

    def why(name, version):
        asked.append((name, version))
        return f"why {name}"

    assert newest_releases.held_back(names, newest, installed, why) == [
        "torch: newest 2.15.0 did not install (2.14.1+cpu installed): why torch (pip)",
        "transformers: newest 5.25.0 did not install (5.24.0 installed): why transformers (pip)",
        "gone: its newest release is unknown (nothing installed): pip index versions found none",
        "missing: newest 1.0 did not install (nothing installed): why missing (pip)",
    ]
    assert asked == [("torch", "2.15.0"), ("transformers", "5.25.0"), ("missing", "1.0")]
    installed["torch"] = "2.15.0+cpu"  # a local build of the newest release is that release
    assert newest_releases.held_back(["torch"], newest, installed, why) == []

"""Compare the installed packages with the tested set in requirements.txt.

    python scripts/check_env.py                      # this environment against requirements.txt
    python scripts/check_env.py --requirements FILE  # against another pin file
    python scripts/check_env.py --ignore_missing     # only the installed packages (scripts/check_upgrades.sh)

Prints one line per package whose installed version differs from its pin (or that is missing) and exits 1 if
there is any; prints the tested versions of the main libraries and exits 0 otherwise. Reads only package metadata:
it imports none of the libraries, so it also works where one of them fails to import.
"""

import argparse
import os
import re
import sys
from importlib import metadata

DEFAULT_REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "requirements.txt")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:#.*)?$")
MAIN = ("torch", "transformers", "tokenizers", "accelerate", "peft", "datasets", "deepspeed", "bitsandbytes")


def canonical(name: str) -> str:
    """PEP 503 normalised name: 'PyYAML' and 'pyyaml', 'typing_extensions' and 'typing-extensions' are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path) -> dict[str, str]:
    """{canonical name: pinned version} of every `name==version` line; anything else is an error naming the line."""
    pins = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#") or line == "-e .":  # -e .: this project itself
                continue
            match = PIN.match(line)
            if not match:
                raise ValueError(f"{path}:{number}: {line!r} is not an exact pin (name==version)")
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def differences(pins: dict[str, str], installed: dict[str, str], ignore_missing: bool = False) -> list[str]:
    """One line per pinned package that is missing or at another version, in the order of the pin file."""
    lines = []
    for name, pinned in pins.items():
        found = installed.get(name)
        if found is None:
            if not ignore_missing:
                lines.append(f"{name}: not installed (tested: {pinned})")
        elif found != pinned:
            lines.append(f"{name}: {found} installed, {pinned} tested")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--requirements", default=DEFAULT_REQUIREMENTS, help="pin file (default: requirements.txt)")
    parser.add_argument(
        "--ignore_missing", action="store_true", help="compare only the pinned packages that are installed"
    )
    args = parser.parse_args(argv)
    try:
        pins = read_pins(args.requirements)
    except (OSError, ValueError) as error:
        print(f"check_env.py: {error}", file=sys.stderr)
        return 2
    installed = installed_versions()
    found = differences(pins, installed, args.ignore_missing)
    if found:
        print(f"{len(found)} package(s) differ from the tested set ({os.path.normpath(args.requirements)}):")
        print("\n".join(f"  {line}" for line in found))
        print("Install the tested set with: pip install -r requirements.txt")
        return 1
    main_versions = ", ".join(f"{name} {pins[name]}" for name in MAIN if name in pins)
    if args.ignore_missing:
        count = sum(name in installed for name in pins)
        print(f"the {count} installed of the {len(pins)} pinned packages match the tested set ({main_versions})")
    else:
        print(f"all {len(pins)} pinned packages match the tested set ({main_versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

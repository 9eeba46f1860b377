#!/usr/bin/env bash
# Try the newest releases before pinning them: a throwaway venv with the newest version the registry serves of
# every library in requirements.txt's "uses directly" section, then the fast part of the test suite there.
# Prints each library whose newest release did not install, with pip's reason (pip settles quietly for an older
# one), the version differences from the tested set, and the failing tests. Not part of CI (CI installs the pins).
# Exit status: 0 the newest releases pass; pytest's on failures; 6 the tests pass, but some newest release did not
# install (so what passed is the set printed, not the newest); 2 no venv to test (torch or transformers missing).
#
#   scripts/check_upgrades.sh                 # fast part of the suite
#   scripts/check_upgrades.sh tests/test_x.py # these tests instead
#   KEEP_VENV=1 scripts/check_upgrades.sh     # keep the venv to investigate (its path is printed)
#
# To adopt the new set: fix what fails, pin the printed versions in requirements.txt (and the rest of a
# `pip freeze` of that venv), set TESTED_TRANSFORMERS in phi3v/compat.py, and run the whole suite.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-python3}
# The multi-process tests (torchrun, DeepSpeed, kills) take most of the suite's time and rarely break alone.
FAST_TESTS=(tests --ignore=tests/test_distributed.py --ignore=tests/test_reliability.py --ignore=tests/test_resume.py
            --deselect=tests/test_check_env.py::test_this_environment_is_the_tested_set)
if [ "$#" -gt 0 ]; then FAST_TESTS=("$@"); fi

VENV="$(mktemp -d "${TMPDIR:-/tmp}/phi3v-upgrades.XXXXXX")"
cleanup() { if [ -z "${KEEP_VENV:-}" ]; then rm -rf "$VENV"; else echo "venv kept: $VENV"; fi; }
trap cleanup EXIT

# The package names of the "uses directly" section, without their pins.
DIRECT=$(awk '/^# --- what the project uses directly/{on=1; next} /^# ---/{on=0} on && /==/{sub(/==.*/, ""); print}' \
    "$ROOT/requirements.txt")
echo "== newest releases of: $(echo $DIRECT)"
"$PYTHON" -m venv "$VENV" || exit 2
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# shellcheck disable=SC2086
if ! "$VENV/bin/python" -m pip install -q --upgrade $DIRECT 2>&1 | grep -v "^WARNING: Location"; then :; fi
# The project itself, as requirements.txt's "-e ." installs it (the scripts the tests run import phi3v).
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" 2>&1 | grep -v -e "^WARNING: Location" -e "^ " -e "^$" || true
echo "== newest releases that did not install"
# shellcheck disable=SC2086
HELD_BACK=$("$VENV/bin/python" "$ROOT/scripts/newest_releases.py" $DIRECT)
held_status=$?
echo "$HELD_BACK"
if ! "$VENV/bin/python" -c "import transformers, torch" 2>/dev/null; then
    echo "== the newest releases do not install together (see pip's output above)"
    exit 2
fi

echo "== version differences from requirements.txt"
"$VENV/bin/python" "$ROOT/scripts/check_env.py" --ignore_missing | grep -v "^Install the tested"

echo "== tests: ${FAST_TESTS[*]}"
cd "$ROOT" || exit 2
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfE "${FAST_TESTS[@]}" 2>&1 | tail -n 60
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then echo "== failures above (pytest exit $status)"; exit "$status"; fi
if [ "$held_status" -ne 0 ]; then  # repeated here, beside the verdict it qualifies
    echo "== the tests pass, but not with the newest release of every library: these were tested at the version"
    echo "   installed (the others at their newest)"
    echo "${HELD_BACK:-(newest_releases.py failed: see its error above)}"
    exit 6
fi
echo "== the newest releases pass"

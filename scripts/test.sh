#!/usr/bin/env bash
# The test command of the README and of .ci/run (run it in the project's venv): Debian's Chromium and its driver for
# the Space's browser test, installed when missing (never a downloaded browser; apt-get needs root, or sudo), then
# the linter and the test suite (tests marked `slow` are excluded by default). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo"
  $as_root apt-get update -qq && $as_root apt-get install -y -qq chromium chromium-driver
fi
ruff check .
python -m pytest -q "$@"

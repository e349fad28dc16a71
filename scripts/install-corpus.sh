#!/usr/bin/env bash
# Install the demo corpus (Debian's python3.11-doc: ~11 MB of reStructuredText sources) if missing,
# and print the directory that holds its html/_sources/**/*.rst.txt files.
set -euo pipefail
find_sources() {
  dpkg -L python3.11-doc 2>/dev/null | grep -m1 '/html/_sources$' || true
}
dir=$(find_sources)
if [ -z "$dir" ] || [ ! -d "$dir" ]; then
  if ! command -v apt-get >/dev/null; then
    echo "install-corpus: apt-get not found; install Debian's python3.11-doc or set CORPUS=DIR" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install-corpus: installing python3.11-doc" >&2
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3.11-doc >&2
  dir=$(find_sources)
fi
[ -d "$dir" ] || { echo "install-corpus: python3.11-doc installed but html/_sources not found" >&2; exit 1; }
echo "$dir"

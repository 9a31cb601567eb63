#!/usr/bin/env bash
# A Flower federation on 127.0.0.1 for a demonstration: TLS certificates and node keys made in
# FOLDER, a SuperLink with SuperNode authentication, one SuperNode per client (each given only its
# own data file with --data); with --run KEY=VALUE ..., hsplitlora runs on it and everything stops
# after, else Ctrl-C stops everything it started.
#   scripts/flower-local.sh FOLDER [CLIENTS] [--data FILE ...] [--run KEY=VALUE ...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
folder="${1:?usage: scripts/flower-local.sh FOLDER [CLIENTS] [--data FILE ...] [--run KEY=VALUE ...]}"
shift
clients=2
if [[ $# -gt 0 && "$1" != --* ]]; then clients="$1"; shift; fi
exec "$here/.venv/bin/python" -m hsplitlora.engines.flower_local --folder "$folder" --clients "$clients" "$@"

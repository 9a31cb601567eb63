#!/usr/bin/env bash
# A Flower federation on 127.0.0.1 for a demonstration: TLS certificates and node keys made in
# FOLDER, a SuperLink with SuperNode authentication, one SuperNode per client (each given only its
# own data file); Ctrl-C stops everything it started.
#   scripts/flower-local.sh FOLDER [CLIENTS] [DATA_FILE ...]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
folder="${1:?usage: scripts/flower-local.sh FOLDER [CLIENTS] [DATA_FILE ...]}"
clients="${2:-2}"
shift $(( $# >= 2 ? 2 : 1 ))
exec "$here/.venv/bin/python" -m hsplitlora.engines.flower_local --folder "$folder" --clients "$clients" --data "$@"

#!/usr/bin/env bash
# retrogen container entrypoint.
#   retrogen-entrypoint healthcheck   exit 0 iff GET /healthz on this container answers 200 (HEALTHCHECK)
#   retrogen-entrypoint CMD...        prepare the environment, then exec CMD (default: retrogen serve, bound to
#                                     RETROGEN_HOST:RETROGEN_PORT unless --host/--port are given)
# Preparation: when RETROGEN_INDEXES is unset, every complete index under RETROGEN_INDEX_ROOT (a folder with a
# manifest.json) is configured under its folder name; the data folder must be writable for serve/worker.
set -euo pipefail

log() { printf 'retrogen-entrypoint: %s\n' "$*" >&2; }

if [[ "${1:-}" == "healthcheck" ]]; then
    exec python - <<'PY'
import os, sys, urllib.request
url = f"http://127.0.0.1:{os.environ.get('RETROGEN_PORT', '8000')}/healthz"
try:
    with urllib.request.urlopen(url, timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # connection refused, timeout, HTTP error: unhealthy
    print(f"healthcheck {url}: {e}", file=sys.stderr)
    sys.exit(1)
PY
fi

if [[ $# -eq 0 ]]; then
    set -- retrogen serve
fi

index_root="${RETROGEN_INDEX_ROOT:-/indexes}"
if [[ -z "${RETROGEN_INDEXES:-}" && -d "$index_root" ]]; then
    json="" names=()
    for manifest in "$index_root"/*/manifest.json; do
        [[ -f "$manifest" ]] || continue
        dir="$(dirname "$manifest")"
        name="$(basename "$dir")"
        if [[ ! "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; then
            log "skipping index folder '$name': names are letters, digits, '_', '.', '-'"
            continue
        fi
        [[ "$dir" =~ [\"\\] ]] && { log "skipping index folder '$dir': quote or backslash in path"; continue; }
        json+="${json:+,}\"$name\":{\"path\":\"$dir\"}"
        names+=("$name")
    done
    if [[ ${#names[@]} -gt 0 ]]; then
        export RETROGEN_INDEXES="{$json}"
        log "indexes from $index_root: ${names[*]}"
    else
        log "no index (folder with manifest.json) under $index_root; retrieval endpoints will answer 404"
    fi
fi

if [[ "${1:-}" == "retrogen" && ( "${2:-}" == "serve" || "${2:-}" == "worker" ) ]]; then
    data_dir="${RETROGEN_DATA_DIR:-/data}"
    mkdir -p "$data_dir" 2>/dev/null || true
    probe="$data_dir/.write-test.$$"
    if ! ( : > "$probe" ) 2>/dev/null; then
        log "data folder $data_dir is not writable by uid $(id -u); mount a volume owned by uid $(id -u) (e.g. chown 10001 on the host)"
        exit 73  # EX_CANTCREAT
    fi
    rm -f "$probe"
fi

# `retrogen serve` binds loopback by default; in a container it must listen on the published port.
if [[ "${1:-}" == "retrogen" && "${2:-}" == "serve" ]]; then
    case " $* " in
        *" --host "*|*" --host="*) ;;
        *) set -- "$@" --host "${RETROGEN_HOST:-0.0.0.0}" ;;
    esac
    case " $* " in
        *" --port "*|*" --port="*) ;;
        *) set -- "$@" --port "${RETROGEN_PORT:-8000}" ;;
    esac
fi

exec "$@"

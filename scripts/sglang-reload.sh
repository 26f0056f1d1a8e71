#!/usr/bin/env bash
# The reload recipe for `delta-follow --reload-cmd`: ask an sglang server to load the host-local
# checkpoint delta-follow just verified, and fail unless it answers {"success": true}.
#
#   delta-follow ... --reload-cmd 'scripts/sglang-reload.sh http://127.0.0.1:30000'
#
# Uses DISAGG_LOCAL and DISAGG_VERSION from delta-follow's environment. Only loopback or
# cluster-internal URLs belong here: the engine's admin endpoint must not be public.
set -euo pipefail
url=${1:?usage: sglang-reload.sh URL}
: "${DISAGG_LOCAL:?set by delta-follow}" "${DISAGG_VERSION:?set by delta-follow}"
# The value of $1 as the inside of a JSON string: backslashes and double quotes escaped; a path
# with a control character (a newline, a tab) is refused rather than sent half-escaped.
json_string() {
    local s=$1
    if [[ $s == *[[:cntrl:]]* ]]; then
        echo "sglang-reload: $2 contains a control character; not sent" >&2
        exit 2
    fi
    s=${s//\\/\\\\}
    printf '%s' "${s//\"/\\\"}"
}
path_json=$(json_string "$DISAGG_LOCAL" DISAGG_LOCAL)
version_json=$(json_string "$DISAGG_VERSION" DISAGG_VERSION)
body=$(printf '{"model_path": "%s", "weight_version": "%s", "flush_cache": true}' "$path_json" "$version_json")
answer=$(curl -sS --max-time "${SGLANG_RELOAD_TIMEOUT:-600}" -X POST "$url/update_weights_from_disk" \
    -H 'Content-Type: application/json' -d "$body") || { echo "sglang-reload: POST failed" >&2; exit 1; }
case "$answer" in
    *'"success": true'*|*'"success":true'*) exit 0 ;;
    *) echo "sglang-reload: engine refused version $DISAGG_VERSION: $answer" >&2; exit 1 ;;
esac

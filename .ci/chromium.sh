#!/usr/bin/env bash
# Install Debian's chromium if missing and check that headless --dump-dom works on a local page.
#
# The page is served by `python -m http.server` bound to 127.0.0.1; the server is stopped by its pid.
# Prints `CHROMIUM=<path>` on success. Installing needs root. Env: PYTHON (default python3).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
FLAGS=(--headless --no-sandbox --disable-gpu --disable-background-networking
    --disable-component-update --disable-sync --no-first-run)
T0=$SECONDS

log() { echo "[chromium.sh +$((SECONDS - T0))s] $*"; }
die() {
    echo "[chromium.sh] FAILED: $*" >&2
    exit 1
}

if ! command -v chromium >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die "chromium is not installed and installing it needs root"
    log "installing chromium"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q -o DPkg::Lock::Timeout=600 chromium fonts-dejavu-core \
        >/tmp/tpb-chromium-apt.log 2>&1; then
        apt-get update -q -o DPkg::Lock::Timeout=600 >>/tmp/tpb-chromium-apt.log 2>&1 || true
        apt-get install -y -q -o DPkg::Lock::Timeout=600 chromium fonts-dejavu-core \
            >>/tmp/tpb-chromium-apt.log 2>&1 ||
            die "apt-get install chromium failed (log: /tmp/tpb-chromium-apt.log)"
    fi
fi
CHROMIUM=$(command -v chromium)

WORK=$(mktemp -d /tmp/tpb-chromium-check.XXXXXX)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

MARKER="tpb-chromium-check-$$"
mkdir -p "$WORK/site" "$WORK/profile"
# The text is written by script so that only a real browser (not the raw HTML) contains it.
cat >"$WORK/site/index.html" <<EOF
<!doctype html><html><body><p id="m"></p>
<script>document.getElementById('m').textContent = ['$MARKER', 'rendered'].join(':');</script>
</body></html>
EOF

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PYTHON" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/site" \
    </dev/null >"$WORK/http.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 50); do
    "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break
    sleep 0.1
done

DOM=$(timeout 60 "$CHROMIUM" "${FLAGS[@]}" --user-data-dir="$WORK/profile" --dump-dom \
    "http://127.0.0.1:$PORT/index.html" 2>"$WORK/chromium.err") || {
    tail -n 20 "$WORK/chromium.err" >&2
    die "chromium --headless --dump-dom failed"
}
if ! grep -q "$MARKER:rendered" <<<"$DOM"; then
    echo "$DOM" | head -c 2000 >&2
    die "the dumped DOM lacks the script-rendered marker"
fi
log "ok: $("$CHROMIUM" --version 2>/dev/null)"
echo "CHROMIUM=$CHROMIUM"

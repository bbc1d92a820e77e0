#!/bin/sh
# Installs the third-party JavaScript of the web explorer into static/vendor/ from the npm
# registry (no CDN: the explorer runs on closed networks). Idempotent: does nothing when the
# pinned version is already there. Needs `npm` (it checks the tarball's registry integrity).
#   static/fetch_vendor.sh            # install or keep
#   HTMX_VERSION=2.0.11 static/fetch_vendor.sh
set -eu

HTMX_VERSION="${HTMX_VERSION:-2.0.11}"
here=$(cd "$(dirname "$0")" && pwd)
vendor="$here/vendor"
stamp="$vendor/htmx.version"

if [ -s "$vendor/htmx.min.js" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$HTMX_VERSION" ]; then
    exit 0
fi
command -v npm >/dev/null 2>&1 || {
    echo "fetch_vendor: npm is needed to install htmx.org@$HTMX_VERSION" >&2
    exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
(cd "$tmp" && npm pack --silent --loglevel=error "htmx.org@$HTMX_VERSION" >/dev/null)
tar -xzf "$tmp"/htmx.org-*.tgz -C "$tmp"
test -s "$tmp/package/dist/htmx.min.js"

mkdir -p "$vendor"
cp "$tmp/package/dist/htmx.min.js" "$vendor/htmx.min.js.part"
cp "$tmp/package/LICENSE" "$vendor/htmx.LICENSE" 2>/dev/null || true
mv "$vendor/htmx.min.js.part" "$vendor/htmx.min.js"
printf '%s\n' "$HTMX_VERSION" > "$stamp"
echo "installed htmx.org@$HTMX_VERSION into $vendor"

#!/usr/bin/env bash
# Rebuilds vendor/dfdx from the published dfdx 0.13.0 plus vendor/dfdx.patch and compares it with
# the committed copy: fails on any difference. `--write` regenerates the patch from the copy.
# Needs curl (or a crate file: DFDX_CRATE=path/to/dfdx-0.13.0.crate).
set -euo pipefail
cd "$(dirname "$0")"
SHA256=c6dbcb8a7363d8b434ca20bd3808ab9f6ee77e6916ca1d511f8e3c725d0b340e  # crates.io's checksum
# What the vendored copy keeps of the published crate (examples, tests and CI files left out).
KEEP=(Cargo.toml LICENSE-APACHE LICENSE-MIT README.md benches build.rs src)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
crate=${DFDX_CRATE:-$tmp/dfdx.crate}
[ -f "$crate" ] || curl -sSfL https://static.crates.io/crates/dfdx/dfdx-0.13.0.crate -o "$crate"
echo "$SHA256  $crate" | sha256sum -c --quiet - || { echo "dfdx-0.13.0.crate: checksum mismatch" >&2; exit 1; }
tar xzf "$crate" -C "$tmp"
mkdir -p "$tmp/a" "$tmp/b"
for f in "${KEEP[@]}"; do
  cp -r "$tmp/dfdx-0.13.0/$f" "$tmp/a/"
  cp -r "dfdx/$f" "$tmp/b/"
done
if [ "${1:-}" = --write ]; then
  (cd "$tmp" && diff -ruN a b) > dfdx.patch || true
  echo "wrote vendor/dfdx.patch ($(grep -c '^@@' dfdx.patch) hunks)"
  exit 0
fi
(cd "$tmp/a" && patch -s -p1 < "$OLDPWD/dfdx.patch")
if diff -r "$tmp/a" "$tmp/b" >/dev/null && [ -z "$(cd dfdx && ls | grep -vxE "$(IFS='|'; echo "${KEEP[*]}")|SWITCHLAB_PATCH.md")" ]; then
  echo "vendor/dfdx = dfdx 0.13.0 + vendor/dfdx.patch ($(grep -c '^@@' dfdx.patch) hunks)"
else
  echo "vendor/dfdx differs from dfdx 0.13.0 + vendor/dfdx.patch: review the change, then run vendor/check-dfdx-patch.sh --write" >&2
  diff -r "$tmp/a" "$tmp/b" | head -40 >&2 || true
  exit 1
fi

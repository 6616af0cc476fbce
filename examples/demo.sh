#!/usr/bin/env bash
# The README's first command: import the sample OCI image, start a read-write (container) layer
# on it, write through its mount, and show what changed.
#
#   examples/demo.sh [ROOT]      (default: graphctl's own default root, /var/lib/graphctl for
#                                 root, ~/.local/share/graphctl for a normal user)
#
# As root the overlay driver is used; as a normal user graphctl falls back to vfs in the user's
# data directory and says so.
# Safe to run again: the import skips layers that are present and the container layer is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
root_args=()
if [ -n "${1:-}" ]; then root_args=(--root "$1"); fi
echo "building graphctl (release; the first build takes a few minutes)..." >&2
cargo build --release -p graphctl
# Where cargo put it (CARGO_TARGET_DIR or a configured target-dir move it), with bash and sed
# only: the demo needs nothing but cargo and bash.
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="${target_dir:-target}/release/graphctl"
g() {
    echo "\$ graphctl${root_args[*]:+ ${root_args[*]}} $*" >&2
    "$bin" "${root_args[@]}" "$@"
}

top=$(g import examples/sample-image)
g exists demo || g create --rw --parent "$top" demo
mnt=$(g mount demo)
echo "hello from the demo" > "$mnt/hello.txt"
rm -f "$mnt/etc/hostname"
g changes demo
g tree
g status
g unmount demo

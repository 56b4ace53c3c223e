# The shared start of the table scripts (sourced): the repository root, the
# set-up, a release build, the zoo size ($1: small or micro) and its window.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size=${1:-small}
scripts/setup.sh
cargo build --release --locked
amalgam=target/release/amalgam
case $size in
  micro) window=65 ;;
  *) window=129 ;;
esac

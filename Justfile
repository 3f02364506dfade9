# Ward's tasks. Run through ./dev on a fresh machine (it installs Envoy and just).

set shell := ["bash", "-euo", "pipefail", "-c"]

export ENVOY_BIN := env("ENVOY_BIN", justfile_directory() / ".tools/venv/bin/envoy")

# List the recipes.
default:
    @just --list

# Build the ward binary (debug).
build:
    cargo build --bins

# The local mesh demo: Ward + two services with real Envoy sidecars on loopback. Extra args go to `ward demo` (e.g. --once).
demo *ARGS: build
    cargo run --quiet -- demo {{ARGS}}

# Run Ward against a config directory (default: the demo mesh).
serve DIR="examples/local-mesh" *ARGS:
    cargo run --quiet -- serve --config-dir {{DIR}} {{ARGS}}

# The whole test suite: formatting, lints, unit, integration and real-Envoy end-to-end tests.
test: lint
    test -x "$ENVOY_BIN" || { echo "Envoy not found at $ENVOY_BIN: run ./dev (it installs it)"; exit 1; }
    cargo test --all-targets --no-fail-fast
    cargo test --doc

# Formatting and clippy, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

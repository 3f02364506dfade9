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

# Criterion micro-benchmarks: translation, encoding, per-stream work of an endpoint change.
bench *ARGS:
    cargo bench --bench translate -- {{ARGS}}

# Load benchmark (release): N simulated sidecars against `ward serve` on a mesh of S services; see BENCHMARKS.md.
load N="1000" S="100" PROTOCOL="delta" *ARGS:
    cargo build --release --bins
    ulimit -n "$(ulimit -Hn)" && ./target/release/ward-load run --proxies {{N}} --services {{S}} --protocol {{PROTOCOL}} {{ARGS}}

# Full certificate rotation of N connected sidecars (release, Ward in-process).
load-rotate N="1000" S="100" *ARGS:
    cargo build --release --bins
    ulimit -n "$(ulimit -Hn)" && ./target/release/ward-load rotate --proxies {{N}} --services {{S}} {{ARGS}}

# Certificate issuance rate on one core beside ring's raw ECDSA P-256 rates (release).
load-certs COUNT="5000":
    cargo build --release --bins
    ./target/release/ward-load certs --count {{COUNT}}

# The whole BENCHMARKS.md table (takes several minutes; 10,000 proxies need `ulimit -n` ≥ 20000).
load-all:
    cargo build --release --bins
    ulimit -n "$(ulimit -Hn)" && for n in 100 1000 10000; do for s in 100 1000; do ./target/release/ward-load run --proxies $n --services $s --protocol delta --changes 3 | grep RESULT; done; done
    ulimit -n "$(ulimit -Hn)" && for n in 100 1000; do ./target/release/ward-load run --proxies $n --services 100 --protocol sotw --changes 3 | grep RESULT; done
    ulimit -n "$(ulimit -Hn)" && ./target/release/ward-load rotate --proxies 10000 --services 100 | grep RESULT
    ./target/release/ward-load certs --count 5000

# Twenty or more real Envoy sidecars converging after a change (also in the normal test run).
scale-envoy:
    cargo test --test scale_envoy -- --nocapture

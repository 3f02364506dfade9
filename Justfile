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
test: lint system-deps
    test -x "$ENVOY_BIN" || { echo "Envoy not found at $ENVOY_BIN: run ./dev (it installs it)"; exit 1; }
    # Benches are type-checked by clippy above and run with `just bench`.
    cargo test --lib --bins --tests --no-fail-fast

# System tools the tests use besides Envoy: openssl (independent TLS checks),
# ip, iptables and setpriv (the transparent-interception test builds pods in
# network namespaces). Installed from Debian/Ubuntu packages when missing.
system-deps:
    #!/usr/bin/env bash
    set -euo pipefail
    missing=()
    for t in openssl:openssl ip:iproute2 iptables:iptables setpriv:util-linux; do
      command -v "${t%%:*}" >/dev/null || missing+=("${t##*:}")
    done
    [ ${#missing[@]} -eq 0 ] && exit 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "system-deps: installing ${missing[*]}" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "system-deps: missing ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
      exit 1
    fi

# Formatting and clippy, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# --- Kubernetes (kind). Needs Docker, kind and kubectl; see README "Run it on kind". ---

kind_cluster := env("KIND_CLUSTER", "ward")

# Create a kind cluster for the demo.
kind-up:
    kind create cluster --name {{kind_cluster}} --wait 120s

# Build the image, load it into kind, apply manifests/, wait, then check mTLS, STRICT and rotation.
kind-demo:
    #!/usr/bin/env bash
    set -euo pipefail
    ctx="kind-{{kind_cluster}}"
    k() { kubectl --context "$ctx" "$@"; }
    docker build -t ward:dev .
    docker build --target redirect-init -t ward-redirect-init:dev .
    kind load docker-image ward:dev ward-redirect-init:dev --name {{kind_cluster}}
    k apply -k manifests/
    # Short-lived workload certificates so a rotation happens during the demo.
    # (Only once: a second --cert-ttl would be refused by the CLI.)
    k -n ward-system get deployment ward -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q -- --cert-ttl \
      || k -n ward-system patch deployment ward --type json \
           -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--cert-ttl=2m"}]'
    k -n ward-system rollout status deployment/ward --timeout=180s
    k -n demo rollout status deployment/server --timeout=180s
    k -n demo rollout status deployment/client --timeout=180s
    pf() { k -n demo port-forward "deployment/$1" "$2:$3" >/dev/null 2>&1 & echo $!; }
    pids=("$(pf client 18080 8080)" "$(pf server 19000 15000)" "$(pf client 18000 15000)")
    trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
    sleep 3
    echo "1. client -> server through both sidecars (mTLS):"
    curl -fsS http://127.0.0.1:18080/call | tee /dev/stderr | grep -q server
    handshakes=$(curl -fsS http://127.0.0.1:19000/stats | awk -F': ' '/^listener\..*ssl\.handshake:/ {s+=$2} END {print s+0}')
    test "$handshakes" -gt 0 || { echo "no TLS handshakes on the server sidecar"; exit 1; }
    echo "   server sidecar TLS handshakes: $handshakes"
    echo "2. plaintext to the server's sidecar is refused under STRICT:"
    # A pod without a sidecar, outside the mesh's identities.
    k -n default delete pod plaintext-probe --ignore-not-found --wait=true
    k -n default run plaintext-probe --image=curlimages/curl --restart=Never --command -- sleep 600
    trap 'kill "${pids[@]}" 2>/dev/null || true; k -n default delete pod plaintext-probe --wait=false >/dev/null 2>&1 || true' EXIT
    k -n default wait --for=condition=Ready pod/plaintext-probe --timeout=120s
    server_ip=$(k -n demo get pod -l app=server -o jsonpath='{.items[0].status.podIP}')
    probe() { k -n default exec plaintext-probe -- curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://$server_ip:8080/"; }
    echo "   before: PERMISSIVE (the mesh default) lets plaintext in: HTTP $(probe)"
    k apply -f manifests/policies/mesh-strict.yaml
    # The rollout is staged (servers accept both, clients switch, servers go STRICT).
    refused=no
    for _ in $(seq 1 30); do
      if ! probe >/dev/null 2>&1; then refused=yes; break; fi
      sleep 2
    done
    test "$refused" = yes || { echo "plaintext still accepted 60 s after STRICT: not enforced"; exit 1; }
    echo "   refused"
    curl -fsS http://127.0.0.1:18080/call | grep -q server || { echo "mesh traffic broke under STRICT"; exit 1; }
    echo "   and client -> server still works (mTLS)"
    echo "3. a certificate rotation (TTL 2m, rotated at half life):"
    serial() { curl -fsS http://127.0.0.1:18000/certs | grep -m1 '"serial_number"' ; }
    before=$(serial)
    for _ in $(seq 1 30); do
      sleep 5
      now=$(serial)
      if [ "$now" != "$before" ]; then echo "   rotated: $before -> $now"; break; fi
    done
    test "$now" != "$before" || { echo "no rotation observed in 150 s"; exit 1; }
    curl -fsS http://127.0.0.1:18080/call >/dev/null
    echo "kind demo: OK"

# Delete the kind cluster.
kind-down:
    kind delete cluster --name {{kind_cluster}}

# Validate manifests offline (kustomize render, typed parse, RBAC = API_CALLS).
manifests-check:
    kubectl kustomize manifests/ >/dev/null
    cargo test --test kube_manifests
# Criterion micro-benchmarks: translation, encoding, per-stream work of an endpoint change.
bench *ARGS:
    cargo bench --bench translate -- {{ARGS}}

# Load benchmark (release): N simulated sidecars against `ward serve` on a mesh of S services; see BENCHMARKS.md.
load N="1000" S="100" PROTOCOL="delta" *ARGS:
    cargo build --release --bins
    ulimit -n "$(ulimit -Hn)" && ./target/release/ward-load run --proxies {{N}} --services {{S}} --protocol {{PROTOCOL}} {{ARGS}}

# Full certificate rotation of N connected sidecars (release; Ward as a separate process, triggered by POST /certs/rotate).
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

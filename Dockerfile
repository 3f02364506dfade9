# Ward's image: one static-ish binary on a distroless base, running as non-root.
#   docker build -t ward:dev .
# The same image runs the control plane (`ward serve --kubernetes`), the
# sidecar init container and the demo apps (`ward sample-app`); the
# `redirect-init` target adds iptables for the traffic-redirection init
# container.

FROM rust:1-bookworm AS build
WORKDIR /src
# protoc is not needed: envoy-types ships generated code.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY envoy ./envoy
COPY examples ./examples
COPY benches ./benches
RUN cargo build --release --locked --bin ward \
    && cp target/release/ward /ward \
    && strip /ward

# The init container of pods with redirected traffic (`ward redirect-init`):
# the same binary beside iptables, which distroless does not have.
#   docker build --target redirect-init -t ward-redirect-init:dev .
FROM debian:bookworm-slim AS redirect-init
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /ward /usr/local/bin/ward
ENTRYPOINT ["/usr/local/bin/ward"]
CMD ["redirect-init"]

# The default (last) stage: the control plane, `sidecar-init` and the demo apps.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ward /usr/local/bin/ward
# distroless "nonroot" is uid/gid 65532; the manifests say so too.
USER 65532:65532
EXPOSE 15010 15014
ENTRYPOINT ["/usr/local/bin/ward"]
CMD ["serve", "--kubernetes"]

# Ward's image: one static-ish binary on a distroless base, running as non-root.
#   docker build -t ward:dev .
# The same image runs the control plane (`ward serve --kubernetes`), the
# sidecar init container and the demo apps (`ward sample-app`).

FROM rust:1-bookworm AS build
WORKDIR /src
# protoc is not needed: envoy-types ships generated code.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY envoy ./envoy
COPY examples ./examples
RUN cargo build --release --locked --bin ward \
    && cp target/release/ward /ward \
    && strip /ward

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ward /usr/local/bin/ward
# distroless "nonroot" is uid/gid 65532; the manifests say so too.
USER 65532:65532
EXPOSE 15010 15014
ENTRYPOINT ["/usr/local/bin/ward"]
CMD ["serve", "--kubernetes"]

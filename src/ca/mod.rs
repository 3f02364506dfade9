//! Built-in certificate authority: the root (generated or plugged in), workload and xDS certificates, and per-proxy rotation.

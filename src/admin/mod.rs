//! Admin HTTP: health, readiness, metrics, debug.

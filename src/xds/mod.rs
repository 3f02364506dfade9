//! The ADS server: snapshot cache, streams, authentication.

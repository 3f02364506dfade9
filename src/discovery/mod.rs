//! Service discovery: Kubernetes-style objects (from a directory or the API) converted into a [`crate::model::Mesh`].

//! Ambit's control plane: it watches the cluster (or a directory of the same Kubernetes
//! YAML), turns it into Ambit's mesh model, and will push that model to every ztunnel.
//!
//! - [`resources`]: the Kubernetes objects the control plane keeps, whichever source
//!   they came from.
//! - [`directory`]: the local source, a directory of multi-document Kubernetes YAML.
//! - [`translate`]: the pure function from those objects to the model
//!   (`ambit_core::model::MeshConfig`), with what it had to skip and why.
//! - [`xds`]: the delta xDS server that pushes the model to every ztunnel.
//!
//! This crate must not: decide anything about traffic (ztunnel does, from the model);
//! skip a policy (policies fail closed, issue 6); do IO inside [`translate`].

pub mod app;
pub mod config;
pub mod directory;
pub mod placement;
pub mod resources;
pub mod translate;
pub mod xds;

pub use directory::{Directory, DirectoryError, DocumentError};
pub use resources::{ObjectKey, Resources};
pub use translate::{translate, Skipped, Translation};

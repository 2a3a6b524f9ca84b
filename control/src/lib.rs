//! Ambit's control plane: it watches the cluster (or a directory of the same Kubernetes
//! YAML), turns it into Ambit's mesh model, pushes that model to every ztunnel over
//! delta xDS, and hosts the CA.
//!
//! - [`resources`]: the Kubernetes objects the control plane keeps, whichever source
//!   they came from.
//! - [`kubernetes`]: the cluster source, kube-rs watchers on every kind.
//! - [`directory`]: the local source, a directory of multi-document Kubernetes YAML.
//! - [`publish`]: from the objects (either source) to the placements and the xDS
//!   snapshot.
//! - [`translate`]: the pure function from those objects to the model
//!   (`ambit_core::model::MeshConfig`), with what it had to skip and why; it lives in
//!   `ambit-k8s`, so `ambitctl` runs the same translation.
//! - [`xds`]: the delta xDS server that pushes the model to every ztunnel.
//! - [`token_review`], [`cluster_ca`], [`placement`]: the CA in a cluster: callers
//!   by TokenReview, the root in a Secret and published to every namespace, node
//!   authorization against where pods run.
//!
//! This crate must not: decide anything about traffic (ztunnel does, from the model);
//! skip a policy (policies fail closed, issue 6); do IO inside [`translate`].

pub mod app;
pub mod cluster_ca;
pub mod config;
pub mod directory;
pub mod istio;
pub mod kubernetes;
pub mod leader;
pub mod placement;
pub mod publish;
pub mod redirection;
pub mod status;
pub mod token_review;
pub use ambit_k8s::translate;
pub mod waypoint_deploy;
pub mod xds;

pub use ambit_k8s::{gateway, resources, security, service_entry};

pub use directory::{Directory, DirectoryError, DocumentError};
pub use resources::{ObjectKey, Resources};
pub use translate::{translate, Skipped, Translation};

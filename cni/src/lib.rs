//! `ambit-cni`: the CNI plugin the container runtime invokes (whenever `CNI_COMMAND` is
//! set), chained after the cluster's own network plugin, and the pieces of the node
//! agent it talks to.
//!
//! - [`plugin`]: the plugin, as a pure function of its environment, standard input and
//!   the agent's answers.
//! - [`protocol`]: the plugin ↔ agent messages, and [`protocol::call`], the Unix-socket
//!   transport the plugin uses.
//! - [`agent`]: the node agent (`ambit-cni agent`).
//! - [`cli`]: the command line of the agent and the node maintenance commands.
//! - [`conflist`]: adding ambit-cni to the node's CNI configuration and removing it,
//!   preserving everything else.
//!
//! The plugin must not: change a pod's network itself (the agent does, for pods it
//! enrols), change the primary plugin's result, or fail a pod that is not to be
//! enrolled because of Ambit.

pub mod agent;
pub mod cli;
pub mod conflist;
pub mod plugin;
pub mod protocol;

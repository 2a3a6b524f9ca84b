//! Ambit's node proxy (ztunnel).
//!
//! One ztunnel per node serves every enrolled pod on that node from inside the pod's
//! network namespace: it receives pods from the node agent over the hand-off socket
//! (`ambit_net::handoff`), opens 15001/15006/15008 in each, carries outbound traffic
//! over HBONE (`ambit_net::hbone`) along the path `ambit_core::outbound` decides, and
//! terminates inbound HBONE for its pods.
//!
//! Pieces: [`config`] (flags), [`app`] (wiring and drain), [`pods`] (served pods and
//! their listeners), [`proxy`] (the traffic paths), [`model_file`] (the model from a file; from xDS it is `ambit_net::model_source`),
//! [`metrics`] (Istio's TCP metrics and ztunnel's other Istio metrics),
//! [`access_log`] (one line per connection as it ends), [`callers`] (who opened each open inbound
//! tunnel) and [`admin`] (admin, metrics and readiness
//! endpoints).
//!
//! ztunnel must not make decisions itself (they are pure functions in `ambit_core`) and
//! must not depend on another component.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod callers;
pub mod config;
pub mod metrics;
pub mod model_file;
pub mod open_inbound;
pub mod pods;
pub mod proxy;

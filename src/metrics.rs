//! Metrics hooks called by the data and control planes (filled in with the admin API).

use std::time::Duration;

use crate::balancer::Backend;
use crate::proxy::Service;

/// A proxied connection ended after `took`.
pub fn connection_closed(_service: &Service, _backend: &Backend, _took: Duration) {}

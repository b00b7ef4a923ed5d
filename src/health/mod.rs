//! Control plane: active health checks, one task per backend, with rise/fall thresholds,
//! a faster interval between states, and passive marks from the data plane.

mod check;
mod checker;

pub use check::{CheckError, Checker};
pub use checker::{Start, spawn_checker};

//! graphctl's integration tests, all in one binary (ripgrep's layout): `util` runs the built
//! `graphctl` against a temporary store, `macros` makes one test per driver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The in-tree drivers, linked so that helpers which open a store directly see them.
use drivers as _;

#[macro_use]
mod macros;
mod util;

mod bad_input;
mod cli;
mod e2e;
mod hostile;
mod immutable;
mod import;
mod import_confined;
mod info;
mod json;
mod kernel_profile;
mod one_driver;
mod safety;
mod store_trust;
mod tools;
mod workflow;

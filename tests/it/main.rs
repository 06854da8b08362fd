//! The single integration-test binary (`cargo test --test it`). Each area adds its module
//! here as a `mod xyz;` line; `harness` is the shared toolkit (registries, skopeo, fixtures).

// Test code panics on purpose when something is off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod action;
mod base;
mod build;
mod cache;
mod confine;
mod context;
mod copy;
mod credentials;
mod diskfull;
mod ecr;
mod faults;
mod harness;
mod hostile;
mod image;
mod inputs;
mod k8s;
mod lies;
mod newuser;
mod promises;
mod proxy;
mod push;
mod resolve;
mod roundtrips;
mod scale;
mod smoke;
mod speed;
mod static_base;
mod stream;
mod supply;
